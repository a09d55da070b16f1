"""Generation: prompts (chats or text) in, completions out, batched, on transformers or vLLM."""

from posttrain.generate.engine import Completion, Engine, SamplingParams, VLLMEngine, load_engine, vllm_available

__all__ = ["Completion", "Engine", "SamplingParams", "VLLMEngine", "load_engine", "vllm_available"]
