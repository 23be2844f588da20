"""Built-in inference engine (nano-vllm shape) speaking the SGLang protocol through `server.py`.

    from slime.engine import EngineConfig, LLMEngine, SamplingParams, TokenOutput
"""

from slime.engine.config import EngineConfig
from slime.engine.llm_engine import LLMEngine
from slime.engine.outputs import TokenOutput
from slime.engine.sampling_params import SamplingParams

__all__ = ["EngineConfig", "LLMEngine", "SamplingParams", "TokenOutput"]
