"""Generation: prompts (chats or text) in, completions out, batched, in process, on vLLM or on any OpenAI-compatible endpoint."""

from posttrain.generate.engine import Engine
from posttrain.generate.load import load_engine
from posttrain.generate.params import Completion, SamplingParams
from posttrain.generate.vllm import VLLMEngine, vllm_available

__all__ = ["Completion", "Engine", "SamplingParams", "VLLMEngine", "load_engine", "vllm_available"]
