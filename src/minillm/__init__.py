"""minillm: a small large-language model built from scratch, one chapter at a time.

The public names of each chapter's module are re-exported here, in the order of the book. (The
functions `minillm.generate.generate`, `minillm.train.train` and `minillm.plan.plan` are not: they
share their modules' names.)
"""

from minillm.corpus import EOT, Corpus, CorpusError, Document, load_corpus, stdlib_corpus
from minillm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, TokenizerError, train_bpe
from minillm.attention import AttentionError, CausalSelfAttention, KVCache
from minillm.rope import RopeError, RotaryEmbedding
from minillm.model import LLM, ConfigError, ModelConfig
from minillm.data import DataError, RandomSampler, SequentialSampler, TokenShard, prepare
from minillm.generate import sample_token, stream_text
from minillm.train import TrainConfig, TrainError, load_for_inference
from minillm.distributed import DataParallel, DistributedError, FullyShardedDataParallel, ShardedOptimizer
from minillm.plan import Plan, PlanError
from minillm.instructions import Conversation, Message
from minillm.sandbox import score_function
from minillm.lora import LoRAError, apply_lora, merge_lora
from minillm.sft import ChatTemplate, SFTConfig, SFTError
from minillm.chat import ChatSession
from minillm.dpo import DPOConfig, DPOError, PreferencePair, dpo_loss, generate_pairs, preference_tune

__version__ = "0.1.0"

__all__ = [
    # chapter 00: the corpus
    "EOT", "Corpus", "CorpusError", "Document", "load_corpus", "stdlib_corpus",
    # chapter 01: the tokenizer
    "GPT2_PATTERN", "GPT4_PATTERN", "Tokenizer", "TokenizerError", "train_bpe",
    # chapters 02 and 03: attention
    "AttentionError", "CausalSelfAttention", "KVCache",
    # chapter 04: rotary positions; chapter 05: the model
    "RopeError", "RotaryEmbedding", "LLM", "ConfigError", "ModelConfig",
    # chapter 06: pretraining
    "DataError", "RandomSampler", "SequentialSampler", "TokenShard", "prepare",
    "sample_token", "stream_text",
    "TrainConfig", "TrainError", "load_for_inference",
    # chapter 07: scaling out
    "DataParallel", "DistributedError", "FullyShardedDataParallel", "ShardedOptimizer", "Plan", "PlanError",
    # chapter 08: supervised fine-tuning
    "Conversation", "Message", "score_function", "LoRAError", "apply_lora", "merge_lora", "ChatTemplate", "SFTConfig",
    "SFTError", "ChatSession",
    # chapter 09: preference optimization
    "DPOConfig", "DPOError", "PreferencePair", "dpo_loss", "generate_pairs", "preference_tune",
]
