"""Document functions of the offline easy-vqa tasks (lmms-eval loads this file by path)."""
import ast
from pathlib import Path

from PIL import Image

from casp.data.easy_vqa import normalize_answer


def easy_vqa_doc_to_visual(doc):
    path = Path(doc["image"])
    if not path.is_absolute():
        path = Path(__file__).parent / path
    return [Image.open(path).convert("RGB")]


def easy_vqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['prompt']}{kwargs.get('post_prompt', '')}"


def easy_vqa_process_results(doc, results):
    """Exact match of the reply, normalised as casp's own evaluation does (lower case, first
    word, punctuation and articles dropped), with the reference answer."""
    return {"exact_match": float(normalize_answer(results[0]) == doc["answer"])}


def easy_vqa_ppl_process_results(doc, results):
    """The answer's log-likelihood; the ``perplexity`` aggregation takes exp(-mean)."""
    result = results[0]
    if isinstance(result, str):     # lmms-eval 0.7.3 hands over str((loglikelihood, greedy))
        result = ast.literal_eval(result)
    loglikelihood, _greedy = result
    return {"perplexity": float(loglikelihood)}
