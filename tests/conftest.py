"""Shared fixtures: one demo model on disk, one real vLLM engine, one transformers reference.

Engines take 20-30 s to start on the CPU, so each is built once per test session.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest

from vllm_loglik.reliance import source_of
from vllm_loglik.testing import ApiServer, with_pythonpath

# Each engine reserves this much KV cache (GiB); vLLM's CPU default of 92% of NUMA node 0
# fails once a second engine or a server is running.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Every core on the model, as the README recommends for the CPU build (vLLM keeps one for the
# front-end by default); the suite takes as long either way here, and runs what users run.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
# In the processes that the tests start (servers, the batch CLI, lm-eval, examples, Ray's
# actors), an engine runs in the process that builds it, and its worker in the engine core
# (vLLM's VLLM_ENABLE_V1_MULTIPROCESSING=0, with which the CPU platform keeps the one-process
# executor): an offline engine starts in about 3 s instead of 25, a server in 20 s instead of 35
# (each process spared is an import of torch and vLLM); a server's engine core then holds its
# worker, as on a one-GPU machine. What the CPU build runs by default (an engine-core process
# and a worker process of its own) is tested where the processes matter (DEFAULT_PROCESSES): the
# session's main server, this process's own engines (`default_processes`), the batch CLI's
# Ctrl-C and kill tests, the bench.
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
DEFAULT_PROCESSES = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
for _name, _value in IN_PROCESS.items():
    os.environ.setdefault(_name, _value)


@contextlib.contextmanager
def default_processes():
    """vLLM's default processes for the engines built (and processes started) within: engines
    that share a process share vLLM's distributed state, which the first to shut down tears
    down under the others (`EngineCore.shutdown`), and this process builds several."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in DEFAULT_PROCESSES.items():
            patch.setenv(name, value)
        yield

#: Where every engine of the session (offline, or a server's) writes the id of each request whose
#: prompt logprobs it computed on the target-only path (`vllm_loglik.target_logprobs`); a server
#: that must not take it gets a file of its own.
TRACE = Path(tempfile.mkdtemp(prefix="vllm-loglik-trace-")) / "target-logprobs.txt"
os.environ.setdefault("VLLM_LOGLIK_TARGET_LOGPROBS_TRACE", str(TRACE))

#: `make soak` sets this: the long versions of some tests run, and the tests marked `soak`.
SOAK = os.environ.get("VLLM_LOGLIK_SOAK") == "1"


#: The fixtures that the tests of this run use (collected, not skipped as `soak`).
USED: set[str] = set()


@pytest.hookimpl(trylast=True)  # after `-k` and `-m` have deselected: USED is this run's
def pytest_collection_modifyitems(config, items):
    """Tests marked `soak` (long versions of what `make test` checks in a shorter way) run
    under `make soak` only."""
    skip = pytest.mark.skip(reason="a long version: make soak runs it")
    for item in items:
        if item.get_closest_marker("soak") and not SOAK:
            item.add_marker(skip)
        else:
            USED.update(item.fixturenames)


#: Whether the installed vLLM has Model Runner V1 (0.32, 0.33: the CPU build runs it); from
#: 0.34 on only V2 runs (`make test-vllm-next`), and the tests of V1's patch skip there.
HAS_V1 = source_of("vllm.v1.worker.gpu_model_runner:GPUModelRunner") is not None

#: Small on purpose: rolling texts longer than three windows stay short.
MAX_MODEL_LEN = 128


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    from vllm_loglik.testing import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def llm(model_path):
    from vllm import LLM

    with default_processes():
        engine = LLM(
            model_path,
            dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            enforce_eager=True,
            seed=0,
            # Prefix caching is on (vLLM's default), with small KV blocks as on the test server, so
            # that the offline API's shared-context path runs wherever a context fills a block.
            block_size=32,
            # LoRA adapters can be given per call (`lora_request=`, tests/test_lora.py); the base
            # model's numbers are checked against transformers everywhere else with this on.
            enable_lora=True,
            max_lora_rank=8,
            max_loras=2,
            lora_target_modules=LORA_TARGETS,
        )
    yield engine
    # Stop the engine here: left to the interpreter's exit, its teardown can abort the process.
    engine.llm_engine.engine_core.shutdown()


class Reference:
    """A plain transformers forward pass: what every vLLM number is checked against."""

    def __init__(self, path: str, tokenizer: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path) if tokenizer else None
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def token_logprobs(self, ids: list[int]) -> tuple[list[float], list[int]]:
        """log P(ids[i] | ids[:i]) and the argmax token at each position i >= 1."""
        torch = self.torch
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(ids[1:])
        picked = logprobs.gather(1, target[:, None])[:, 0]
        return picked.tolist(), logprobs.argmax(dim=-1).tolist()

    def score(self, ids: list[int], start: int) -> tuple[list[float], bool]:
        """Per-token logprobs of ids[start:], and whether each is the argmax."""
        lps, argmax = self.token_logprobs(ids)
        lps, argmax = lps[start - 1 :], argmax[start - 1 :]
        return lps, all(a == t for a, t in zip(argmax, ids[start:], strict=True))


@pytest.fixture(scope="session")
def in_process(model_path, tmp_path_factory):
    """The batch CLI's mixed file (`tests/test_batch.py`), scored with an engine in the CLI's
    process: the session's one such run, which the batch, Ray and report tests compare with."""
    from .test_batch import ENGINE_FLAGS, score, write_input

    folder = tmp_path_factory.mktemp("batch")
    expected = write_input(folder / "in.jsonl")
    run = score([model_path, "--input", str(folder / "in.jsonl"), "--output",
                 str(folder / "out.jsonl"), *ENGINE_FLAGS])  # fmt: skip
    return folder, expected, run


@pytest.fixture(scope="session")
def ref(model_path):
    return Reference(model_path)


API_KEY = "test-key"


class Server(ApiServer):
    """The demo model behind a real server, with the test settings and an `openai` client."""

    def __init__(
        self,
        model: str,
        log_path,
        plugin: bool,
        api_key: str | None,
        env: dict | None = None,
        extra_args: list[str] | None = None,
        vllm_serve: bool = False,
        port: int | None = None,
        wait: bool = True,
    ):
        args = [
            "--served-model-name", "tiny", "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--seed", "0",
            # Small KV blocks (the CPU default is 128, longer than any test prompt), so that
            # scoring several continuations of one context exercises the prefix-cache path.
            "--block-size", "32",
        ]  # fmt: skip
        if api_key:
            args += ["--api-key", api_key]
        args += extra_args or []
        self.api_key = api_key
        # IN_PROCESS unless `env` says otherwise, whatever this process's engines run with.
        env = {**IN_PROCESS, **(env or {})}
        super().__init__(
            model, args, log_path, plugin=plugin, timeout=240, env=env, vllm_serve=vllm_serve,
            port=port, wait=wait,
        )

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none")


@pytest.fixture(scope="session")
def hf_bos(model_path, tmp_path_factory):
    """lm-eval's `hf` backend on the local multiple-choice and rolling tasks, in float32, with
    BOS added to every text (`add_bos_token=True`, as vLLM encodes a prompt string) and rolling
    windows of `max_model_len - 2` tokens: the results and the logged samples per task."""
    from .lm_eval_runs import lm_eval

    args = ["--model", "hf", "--model_args",
            f"pretrained={model_path},dtype=float32,add_bos_token=True,max_length={MAX_MODEL_LEN - 2}",
            "--tasks", "loglik_mc,loglik_rolling", "--batch_size", "4"]  # fmt: skip
    return lm_eval(args, tmp_path_factory.mktemp("hf-bos"))


#: Two LoRA adapters of the demo model, served by the LoRA server and the V2-layout server.
ADAPTERS = {"adapter-a": 1, "adapter-b": 2}


@pytest.fixture(scope="session")
def lora_paths(model_path, tmp_path_factory) -> dict[str, str]:
    """Random LoRA adapters of the demo model, built with peft (each seeded differently)."""
    from vllm_loglik.testing import build_lora_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        name: str(build_lora_adapter(model_path, root / name, seed=seed))
        for name, seed in ADAPTERS.items()
    }


#: The modules that the test adapters train. LoRA is put on these only, not on the output layer
#: (see `vllm_loglik.engine_requests.lora_scoring_problem`).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_args(lora_paths: dict[str, str]) -> list[str]:
    """`vllm serve` flags that serve the adapters next to the base model."""
    modules = [f"{name}={path}" for name, path in lora_paths.items()]
    return ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
            "--lora-target-modules", *LORA_TARGETS, "--lora-modules", *modules]  # fmt: skip


#: Adapters may be loaded at run time (/v1/load_lora_adapter): set on the stock server too, whose
#: routes the plugin's server must otherwise equal (tests/test_server.py).
RUNTIME_LORA = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def _main_server(request, logs: Path) -> Server:
    args = lora_args(request.getfixturevalue("lora_paths"))
    env = {**RUNTIME_LORA, **DEFAULT_PROCESSES}
    return Server(request.getfixturevalue("model_path"), logs / "server.log", True, API_KEY,
                  env=env, extra_args=args, wait=False)  # fmt: skip


def _stock_server(request, logs: Path) -> Server:
    return Server(request.getfixturevalue("model_path"), logs / "stock.log", False, None,
                  env=RUNTIME_LORA, wait=False)  # fmt: skip


HOOK_DIR = Path(__file__).parent / "v2_layout"


def _v2_server(request, logs: Path) -> Server | None:
    if not HAS_V1:
        return None
    rewrites = logs / "rewrites.txt"
    rewrites.touch()
    env = {"PYTHONPATH": with_pythonpath(str(HOOK_DIR)), "VLLM_LOGLIK_V2_LAYOUT_LOG": str(rewrites),
           **RUNTIME_LORA,
           # vLLM's own prompt-logprob path, as on a GPU's V2 model runner, where the
           # target-only path does not apply: counted as a fallback (tests/test_target_logprobs.py).
           "VLLM_LOGLIK_TARGET_LOGPROBS": "0",
           "VLLM_LOGLIK_TARGET_LOGPROBS_TRACE": str(logs / "target-logprobs.txt")}  # fmt: skip
    args = lora_args(request.getfixturevalue("lora_paths"))
    srv = Server(request.getfixturevalue("model_path"), logs / "server.log", True, None, env=env,
                 extra_args=args, wait=False)  # fmt: skip
    srv.rewrites = rewrites
    srv.trace = logs / "target-logprobs.txt"
    return srv


#: The session's servers, by fixture name: each starts (without waiting) the server of its
#: fixture in a folder of logs of its own.
SESSION_SERVERS = {"server": _main_server, "stock_server": _stock_server, "v2_server": _v2_server}
_started: dict[str, Server | None] = {}  # started early, not yet asked for


def launch_session_servers(request, names: list[str]) -> None:
    """Start, without waiting, each of the session's servers `names` not started yet."""
    for name in names:
        if name not in _started:
            logs = request.getfixturevalue("tmp_path_factory").mktemp(f"logs-{name}")
            _started[name] = SESSION_SERVERS[name](request, logs)


@pytest.fixture(scope="session", autouse=True)
def _session_servers_start(request):
    """Every session server that this run's tests use starts at the session's first test, so
    that their start-ups (each mostly single-threaded imports, 20-30 s) overlap each other's
    and the first tests' engines."""
    launch_session_servers(request, [name for name in SESSION_SERVERS if name in USED])


def session_server(request, name: str):
    """The session's server `name`, ready; started now if USED did not see it (a fixture that
    asks for it by name)."""
    launch_session_servers(request, [name])
    srv = _started.pop(name)
    return srv.ready() if srv is not None else None


def pytest_sessionfinish(session, exitstatus):
    """Servers started early for tests that did not run after all (stopped with `-x`, say)."""
    for srv in _started.values():
        if srv is not None:
            srv.stop()
    _started.clear()


@pytest.fixture(scope="session")
def server(request):
    """The demo model with the plugin, serving two LoRA adapters next to it; more may be
    loaded at run time (`/v1/load_lora_adapter`)."""
    srv = session_server(request, "server")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def stock_server(request):
    """The same server without VLLM_PLUGINS: stock vLLM behaviour."""
    srv = session_server(request, "stock_server")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def v2_server(request):
    """A server whose engine outputs reach the plugin in the V2 model runner's layout
    (`tests/test_v2_layout.py`), serving the LoRA adapters too: 0.32/0.33's V2 on a GPU,
    simulated on the CPU build's V1 engine. From vLLM 0.34 on the engine is V2 itself, which
    `make test-vllm-next` runs, and the simulation has nothing to add."""
    srv = session_server(request, "v2_server")
    if srv is None:
        pytest.skip("the V2 layout simulated on a V1 engine: this vLLM runs V2 itself")
    yield srv
    srv.stop()
