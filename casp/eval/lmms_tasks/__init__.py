"""lmms-eval task definitions shipped with casp (copied into a task folder with their data by
``casp.eval.lmms.prepare_easy_vqa_task``)."""
