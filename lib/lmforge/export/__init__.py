"""Export: the released model in the formats other tools load, each checked against our own model.

- `hf`: a Hugging Face directory (`LlamaForCausalLM`, or `Qwen3ForCausalLM` with QK-norm) that
  `transformers.AutoModelForCausalLM` / `AutoTokenizer` load with no custom code; `load_any`
  reads it (or one of our model directories) back into a `GPT`.
- `gguf`: GGUF files (f32, f16, q8_0) with the tokenizer embedded, for llama.cpp.
- `onnx`: the logits graph with dynamic batch and sequence, for onnxruntime.
- `card`: the model card.
- `stage`: the `export` stage that writes all of them and proves parity.
"""
