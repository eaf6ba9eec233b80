"""Running fairseq's command-line tools with this plugin, as a user would.

``run_cli`` runs the installed console scripts (``fairseq-preprocess``, ``fairseq-train``, ...) in a
subprocess with ``--user-dir`` pointing at this package, and returns their output.  The helpers
below build the usual argument lists.  Every generation helper passes
``--required-batch-size-multiple 1`` (fairseq issue 5036: otherwise the last batch's tail is dropped)
and :func:`check_all_hypotheses` verifies that every input got a hypothesis.
"""
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Optional, Sequence

import fairseq_ext

USER_DIR = os.path.dirname(os.path.abspath(fairseq_ext.__file__))

# One thread per process keeps 2-core machines responsive when tests run tools side by side.
_ENV_DEFAULTS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

# Subprocess limits only catch hangs; they never judge speed.  The slowest single tool call in the
# tests takes about a minute on an idle 2-core machine and a few minutes under load, so an hour is
# far above any real run.
HANG_TIMEOUT = 3600.0
# For long pipelines that log as they go (recipes): a run is declared hung only after this many
# seconds without a new byte of output (every phase prints a line; the longest silent step, one
# smoke training, takes well under a minute idle).
STALL_TIMEOUT = 1800.0


class CliError(RuntimeError):
    pass


def _tool(name: str) -> List[str]:
    """Command for a fairseq console script, run with this interpreter (works without PATH set up)."""
    module = {
        "fairseq-preprocess": "fairseq_cli.preprocess",
        "fairseq-train": "fairseq_cli.train",
        "fairseq-generate": "fairseq_cli.generate",
        "fairseq-interactive": "fairseq_cli.interactive",
        "fairseq-validate": "fairseq_cli.validate",
        "fairseq-eval-lm": "fairseq_cli.eval_lm",
    }[name]
    return [sys.executable, "-c", f"import sys; from {module} import cli_main; sys.argv[0] = {name!r}; cli_main()"]


def run_cli(
    tool: str,
    args: Sequence[str],
    env: Optional[Dict[str, str]] = None,
    stdin: Optional[str] = None,
    timeout: float = HANG_TIMEOUT,
    check: bool = True,
    cwd: Optional[str] = None,
) -> str:
    """Runs a fairseq tool with ``--user-dir`` (not for preprocess); returns stdout + stderr."""
    full_env = dict(os.environ)
    for k, v in _ENV_DEFAULTS.items():
        full_env.setdefault(k, v)
    full_env.update(env or {})
    cmd = _tool(tool) + [str(a) for a in args]
    if tool != "fairseq-preprocess" and "--user-dir" not in args:
        cmd += ["--user-dir", USER_DIR]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise CliError(f"{tool} failed ({proc.returncode}):\n{' '.join(cmd)}\n{out[-6000:]}")
    return out


def preprocess(raw_dir: str, dest_dir: str, src: str = "src", tgt: str = "tgt", extra: Sequence[str] = ()) -> str:
    """Binarises ``raw_dir/{train,valid,test}.{src,tgt}`` into ``dest_dir`` with a joined dictionary."""
    pref = lambda split: os.path.join(raw_dir, split)  # noqa: E731
    args = ["--source-lang", src, "--target-lang", tgt, "--trainpref", pref("train"), "--validpref", pref("valid")]
    if os.path.exists(os.path.join(raw_dir, f"test.{src}")):
        args += ["--testpref", pref("test")]
    args += ["--destdir", dest_dir, "--joined-dictionary", "--workers", "1", *extra]
    return run_cli("fairseq-preprocess", args)


def preprocess_lm(raw_dir: str, dest_dir: str, extra: Sequence[str] = ()) -> str:
    pref = lambda split: os.path.join(raw_dir, f"{split}.txt")  # noqa: E731
    args = ["--only-source", "--trainpref", pref("train"), "--validpref", pref("valid"), "--testpref", pref("test")]
    args += ["--destdir", dest_dir, "--workers", "1", *extra]
    return run_cli("fairseq-preprocess", args)


TINY_TRANSFORMER = [
    "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]  # fmt: skip


def train(data_bin: str, save_dir: str, flags: Sequence[str], env: Optional[Dict[str, str]] = None) -> str:
    """fairseq-train on CPU with quiet defaults the flags may override (later flags win)."""
    args = [
        data_bin, "--save-dir", save_dir, "--cpu", "--seed", "1",
        "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "2000",
        "--no-progress-bar", "--log-format", "simple", "--log-interval", "1",
        "--required-batch-size-multiple", "1",  # else fairseq drops the last batch's tail (fairseq issue 5036)
        "--num-workers", "0", "--no-epoch-checkpoints",
        *flags,
    ]  # fmt: skip
    return run_cli("fairseq-train", args, env=env)


def generate(data_bin: str, checkpoint: str, flags: Sequence[str] = (), gen_subset: str = "test") -> str:
    """fairseq-generate on CPU over a whole split; raises unless every sentence got a hypothesis."""
    args = [
        data_bin, "--path", checkpoint, "--cpu", "--gen-subset", gen_subset,
        "--batch-size", "64", "--required-batch-size-multiple", "1", "--num-workers", "0",
        "--beam", "1", *flags,
    ]  # fmt: skip
    out = run_cli("fairseq-generate", args)
    check_all_hypotheses(out, count_lines(data_bin, gen_subset))
    return out


def count_lines(data_bin: str, split: str) -> Optional[int]:
    """Sentences in a binarised split (from its .idx file), or None when it cannot be found."""
    from fairseq.data import data_utils

    for name in sorted(os.listdir(data_bin)):
        if name.startswith(split + ".") and name.endswith(".idx"):
            ds = data_utils.load_indexed_dataset(os.path.join(data_bin, name[:-4]), None)
            return len(ds) if ds is not None else None
    return None


def hypotheses(output: str) -> Dict[int, str]:
    """Sentence id -> detokenised hypothesis from fairseq-generate output (D- lines: id, score, text)."""
    return {i: text.split("\t", 1)[-1] for i, text in _tagged_lines(output, "D").items()}


def references(output: str) -> Dict[int, str]:
    """Sentence id -> reference from fairseq-generate output (T- lines)."""
    return _tagged_lines(output, "T")


def _tagged_lines(output: str, tag: str) -> Dict[int, str]:
    found = {}
    for line in output.splitlines():
        m = re.match(rf"^{tag}-(\d+)\t(.*)$", line)
        if m:
            found[int(m.group(1))] = m.group(2)
    return found


def check_all_hypotheses(output: str, expected: Optional[int]):
    """Raises unless fairseq-generate printed one hypothesis per input sentence."""
    got = len(hypotheses(output))
    if expected is not None and got != expected:
        raise CliError(f"fairseq-generate printed {got} hypotheses for {expected} input sentences")


def sacrebleu_score(output: str) -> float:
    """Corpus sacreBLEU of fairseq-generate's D- lines against its T- lines (tokenize none)."""
    import sacrebleu

    hyps, refs = hypotheses(output), references(output)
    ids = sorted(refs)
    return sacrebleu.corpus_bleu([hyps.get(i, "") for i in ids], [[refs[i] for i in ids]], tokenize="none").score


def bench_script(name: str):
    """The module of ``bench/NAME.py`` of this repository (bench/ is not a package), for testing its helpers."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench",
                        f"{name}.py")  # fmt: skip
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_inner_values(log: str, key: str) -> List[tuple]:
    """(num_updates, value of ``key``) of every ``train_inner`` line of a fairseq-train log (--log-format simple)
    that reports ``key``."""
    out = []
    for line in log.splitlines():
        if "| train_inner |" in line:
            fields = dict(re.findall(r"(\w+)=([^,\s]+)", line.split("| train_inner |", 1)[1]))
            if key in fields:
                out.append((int(fields["num_updates"]), float(fields[key])))
    return out


def one_and_two_workers(data_bin: str, workdir, flags: Sequence[str], global_batch: int = 8):
    """fairseq-train with ``flags`` on one worker (``--batch-size global_batch``) and on two gloo workers
    (``--batch-size global_batch / 2`` each): the same global batch.  Returns (single log, double log, single
    save dir, double save dir)."""
    single_dir, double_dir = os.path.join(str(workdir), "single"), os.path.join(str(workdir), "double")
    single = run_cli("fairseq-train", train_args(data_bin, single_dir, [*flags, "--batch-size", str(global_batch)]))
    double = train_distributed(data_bin, double_dir, [*flags, "--batch-size", str(global_batch // 2)], str(workdir))[0]
    assert "training on 2 devices" in double, double[-3000:]
    return single, double, single_dir, double_dir


def assert_same_logged(single: str, double: str, keys: Sequence[str], updates: Sequence[int], abs_tol: float = 2e-4):
    """Every ``key`` logged at the same updates with the same values (within ``abs_tol``) in both logs."""
    import pytest

    for key in keys:
        one, two = train_inner_values(single, key), train_inner_values(double, key)
        assert [u for u, _ in two] == [u for u, _ in one] == list(updates), key
        assert [v for _, v in two] == pytest.approx([v for _, v in one], abs=abs_tol), key


def train_args(data_bin: str, save_dir: str, flags: Sequence[str]) -> List[str]:
    """fairseq-train arguments as in :func:`train`, but keeping the epoch checkpoints (checkpointN.pt)."""
    return [
        data_bin, "--save-dir", save_dir, "--cpu", "--seed", "1", "--optimizer", "adam", "--lr", "0.005",
        "--no-progress-bar", "--log-format", "simple", "--log-interval", "1", "--num-workers", "0", *flags,
    ]  # fmt: skip


def train_distributed(data_bin: str, save_dir: str, flags: Sequence[str], workdir: str, world_size: int = 2,
                      timeout: float = HANG_TIMEOUT, info_loggers: Sequence[str] = ()) -> List[str]:  # fmt: skip
    """fairseq-train with one manually launched process per rank (gloo, legacy_ddp, CPU): every rank's log.

    fairseq lowers the log level of every rank but 0 to WARNING; ``info_loggers`` keep INFO on all ranks.
    """
    init = "file://" + os.path.join(str(workdir), f"dist_init_{uuid.uuid4().hex}")  # must not pre-exist
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    script = "import logging, sys; from fairseq_cli.train import cli_main; sys.argv[0] = 'fairseq-train'; "
    script += "".join(f"logging.getLogger({name!r}).setLevel(logging.INFO); " for name in info_loggers)
    script += "cli_main()"
    base = [sys.executable, "-c", script, *train_args(data_bin, save_dir, flags), "--user-dir", USER_DIR]
    base += [
        "--distributed-world-size", str(world_size), "--distributed-init-method", init,
        "--distributed-backend", "gloo", "--distributed-no-spawn", "--device-id", "0", "--ddp-backend", "legacy_ddp",
    ]  # fmt: skip
    log_paths = [os.path.join(str(workdir), f"rank{r}_{uuid.uuid4().hex}.log") for r in range(world_size)]
    procs = []
    for rank, log_path in enumerate(log_paths):
        with open(log_path, "w") as log_file:
            cmd = base + ["--distributed-rank", str(rank)]
            procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env))
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.poll() not in (None, 0) for p in procs)
        if failed or time.time() > deadline:  # a lone surviving rank would wait forever for its peer
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    logs = [open(path).read() for path in log_paths]
    if any(p.returncode != 0 for p in procs):
        raise CliError(
            "distributed fairseq-train failed: "
            + "; ".join(f"rank {r} rc={p.returncode}:\n{logs[r][-3000:]}" for r, p in enumerate(procs))
        )
    return logs


def wait_for_pipeline(proc: subprocess.Popen, log_path: str, stall_timeout: float = STALL_TIMEOUT) -> int:
    """Waits for ``proc`` (writing its output to ``log_path``); returns its exit code.

    A slow machine never fails this: the process is killed (and the code returned is negative) only
    when ``log_path`` has not grown for ``stall_timeout`` seconds, i.e. when it looks hung.
    """
    last_size, last_change = -1, time.monotonic()
    while proc.poll() is None:
        size = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
        elif now - last_change > stall_timeout:
            # the whole process group: a pipeline's tools are grandchildren of the shell we started
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            break
        time.sleep(1.0)
    return proc.wait()


def run_pipeline(cmd: Sequence[str], log_path: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """Starts ``cmd`` with stdout and stderr going to ``log_path``; finish it with :func:`finish_pipeline`."""
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish_pipeline(proc: subprocess.Popen, log_path: str, stall_timeout: float = STALL_TIMEOUT):
    """(exit code, output) of a process started by :func:`run_pipeline`, waiting as :func:`wait_for_pipeline`."""
    rc = wait_for_pipeline(proc, log_path, stall_timeout)
    with open(log_path, encoding="utf-8") as f:
        out = f.read()
    if rc < 0:
        out += f"\n[no output for {stall_timeout:.0f} s: killed as hung]\n"
    return rc, out
