"""Lossless speculative decoding: sampling parameters, the engine, and slow references.

    from specdec.decode import SpeculativeEngine, SamplingParams
    engine = SpeculativeEngine(target, draft, k=4, tokenizer=tokenizer)
    [result] = engine.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=64))

sampling.py  SamplingParams, top-k / top-p (`process_logits`), the draft's counter-hash sampler
kv.py        BatchKV: a slab-backed DynamicCache with per-slot validity for rows that reject
             differently
forward.py   the model call: a lean Llama forward (bitwise Hugging Face's logits) or model(...)
engine.py    SpeculativeEngine, GenerationResult
detok.py     IncrementalDetokenizer: streaming text of a growing token sequence
reference.py speculative_step (gpt-fast style, no cache), reference_generate, target_generate
"""

from specdec.decode.detok import IncrementalDetokenizer
from specdec.decode.engine import GenerationResult, SpeculativeEngine
from specdec.decode.reference import reference_generate, speculative_step, target_generate
from specdec.decode.sampling import SamplingParams, process_logits, sample

__all__ = [
    "GenerationResult",
    "IncrementalDetokenizer",
    "SamplingParams",
    "SpeculativeEngine",
    "process_logits",
    "reference_generate",
    "sample",
    "speculative_step",
    "target_generate",
]
