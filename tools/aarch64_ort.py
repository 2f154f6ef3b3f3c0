"""Run ONNX models on a real aarch64 ONNX Runtime under QEMU user-mode emulation.

    python tools/aarch64_ort.py setup                       # from nothing, idempotent
    python tools/aarch64_ort.py cpuinfo                     # features each emulated CPU exposes
    python tools/aarch64_ort.py run --cpu cortex-a76 model.onnx in.npz -o out.npz
    python tools/aarch64_ort.py probe --cpu neoverse-n2 model.onnx in.npz   # which kernels ran

`setup` needs only Debian's apt-get/dpkg-deb and pip, and no root: it keeps a private apt state
under the cache folder ($EDGEQ_AARCH64 or $EDGEQ_CACHE/aarch64, default ~/.cache/edgeq/aarch64)
and never touches the host's package database.

- QEMU: Debian's static `qemu-user` from `<codename>-backports` (10.0 on bookworm; bookworm's own
  7.2 knows no `neoverse-n2` and shows the host's /proc/cpuinfo), unpacked with dpkg-deb.
- An arm64 Python: Debian's `python3` and `libstdc++6` for arm64 with their dependencies,
  downloaded by apt-get (`--download-only` against an empty package status, so the whole closure
  comes) and unpacked into a sysroot that `qemu-aarch64 -L` resolves paths in.
- ONNX Runtime and numpy: the PyPI wheels for manylinux_2_28_aarch64 / the sysroot's Python,
  installed with `pip install --target --platform`; onnxruntime at the host's version, so the
  x86 and the aarch64 runs are the same release.

`run` takes npz in and writes npz out. One input file may hold several samples as `s<i>/<name>`
keys (outputs come back the same way); plain `<name>` keys are one sample. Sessions use the CPU
provider at ORT's default optimization level (all), one intra-op thread unless told otherwise.

Emulated time is not a speed figure (TCG translates every instruction); speed comes from the
targets' cost models. This file runs on both sides: the host part uses only the standard library,
the guest part (`guest`) imports numpy and onnxruntime inside the emulated Python.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# QEMU's -cpu names and the MLAS kernel families each one selects (checked with `cpuinfo`, and by
# `probe` with the instructions QEMU translated while a model ran; see BENCHMARKS.md).
CPUS = ("cortex-a53", "cortex-a76", "neoverse-n2", "max")
MIN_QEMU = (8, 2)            # neoverse-n2 and an emulated /proc/cpuinfo for aarch64
ARCH_FEATURES = ("asimd", "asimddp", "fphp", "asimdhp", "i8mm", "bf16", "sve", "sve2", "svei8mm", "sme", "sme2")
# Instructions whose presence tells which kernels ran (mnemonic -> what it means).
KERNEL_INSTRUCTIONS = {
    "sdot": "NEON dot product (s8)", "udot": "NEON dot product (u8)", "usdot": "i8mm mixed-sign dot",
    "smmla": "i8mm matrix multiply (s8)", "ummla": "i8mm matrix multiply (u8)", "usmmla": "i8mm (u8 x s8)",
    "smull": "NEON widening multiply (s8 -> s16)", "umull": "NEON widening multiply (u8 -> u16)",
    "smlal": "NEON widening multiply-add (s8)", "umlal": "NEON widening multiply-add (u8)",
    "sadalp": "pairwise add-accumulate (s16 -> s32)", "uadalp": "pairwise add-accumulate (u16 -> u32)",
    "fmla.4s": "fp32 FMA", "fmla.8h": "fp16 FMA", "bfmmla": "bf16 matrix multiply",
    "smopa": "SME outer product (int8)", "fmopa": "SME outer product (float)",
}


class SetupError(RuntimeError):
    """The emulation could not be set up (no apt/dpkg-deb, no network, no wheel)."""


def default_root() -> Path:
    if os.environ.get("EDGEQ_AARCH64"):
        return Path(os.environ["EDGEQ_AARCH64"])
    return Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq")) / "aarch64"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise SetupError(f"{what}: {cmd[0]} is not installed (this setup needs Debian's apt-get and dpkg-deb)") \
            from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise SetupError(f"{what} failed ({shlex_join(cmd[:3])} ... exit {done.returncode}):\n{tail}")
    return done


def shlex_join(parts) -> str:
    import shlex

    return shlex.join(str(p) for p in parts)


def _os_release() -> dict[str, str]:
    values = {}
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        values[key] = value.strip().strip('"')
    return values


def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.search(r"(\d+)\.(\d+)", text)
    return tuple(int(x) for x in match.groups()) if match else (0, 0)


# ---- setup ----------------------------------------------------------------------------------


class _Apt:
    """apt-get/apt-cache on a private state directory: the host's package database is untouched."""

    def __init__(self, root: Path, codename: str, mirror: str, keyring: str):
        self.dir = root / "apt"
        for sub in ("state/lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "state" / "status").touch()
        suites = f"{codename} {codename}-updates {codename}-backports"
        (self.dir / "sources.list").write_text(
            f"deb [arch=arm64,amd64 signed-by={keyring}] {mirror} {suites.split()[0]} main\n"
            f"deb [arch=arm64,amd64 signed-by={keyring}] {mirror} {suites.split()[1]} main\n"
            f"deb [arch=arm64,amd64 signed-by={keyring}] {mirror} {suites.split()[2]} main\n")
        user = os.environ.get("USER") or ("root" if os.geteuid() == 0 else "")
        self.options = [
            "-o", f"Dir::State={self.dir / 'state'}", "-o", f"Dir::State::status={self.dir / 'state' / 'status'}",
            "-o", f"Dir::Cache={self.dir / 'cache'}", "-o", f"Dir::Etc::SourceList={self.dir / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={self.dir / 'sources.list.d'}",
            "-o", f"Dir::Etc::PreferencesParts={self.dir / 'preferences.d'}",
            "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64", "-o", "APT::Architectures::=amd64",
            "-o", "Debug::NoLocking=1", "-q"]
        if user:
            self.options += ["-o", f"APT::Sandbox::User={user}"]

    def get(self, *args: str, what: str, cwd: Path | None = None) -> str:
        return _run(["apt-get", *self.options, *args], what, cwd=cwd).stdout

    def cache(self, *args: str, what: str) -> str:
        return _run(["apt-cache", *self.options, *args], what).stdout


def _extract(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(into)], f"unpacking {deb.name}")


@dataclass(frozen=True)
class Emulator:
    """A set-up emulation: the static qemu-aarch64, the arm64 sysroot and the wheel folder."""

    root: Path
    qemu: Path
    sysroot: Path
    python: Path       # inside the sysroot (a host path qemu runs)
    site: Path
    info: dict

    @classmethod
    def load(cls, root: Path | None = None) -> Emulator:
        root = Path(root or default_root())
        ready = root / "ready.json"
        if not ready.exists():
            raise SetupError(f"the aarch64 emulation is not set up in {root}: run `python tools/aarch64_ort.py setup`")
        info = json.loads(ready.read_text())
        return cls(root=root, qemu=root / info["qemu"], sysroot=root / "sysroot",
                   python=root / "sysroot" / info["python"], site=root / "site", info=info)

    # -- running ---------------------------------------------------------------------------

    def command(self, cpu: str, *args: str, trace: Path | None = None) -> list[str]:
        cmd = [str(self.qemu), "-L", str(self.sysroot), "-cpu", cpu]
        if trace is not None:
            cmd += ["-d", "in_asm", "-D", str(trace)]
        return cmd + [str(self.python), "-I", *args]

    def environment(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.root), "OMP_NUM_THREADS": "1"}

    def python_call(self, cpu: str, *args: str, trace: Path | None = None, timeout: float | None = None) -> str:
        done = subprocess.run(self.command(cpu, *args, trace=trace), capture_output=True, text=True,
                              env=self.environment(), timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"emulated aarch64 python (-cpu {cpu}) failed with exit {done.returncode}:\n"
                               + "\n".join(done.stderr.strip().splitlines()[-15:]))
        return done.stdout

    def features(self, cpu: str) -> dict:
        """What the emulated CPU reports: /proc/cpuinfo features and ORT's view of them."""
        script = ("import json;f=[l.split(':',1)[1].split() for l in open('/proc/cpuinfo') if l.startswith('Features')];"
                  "print(json.dumps({'features': f[0] if f else []}))")
        return json.loads(self.python_call(cpu, "-c", script, timeout=120))

    def run(self, cpu: str, jobs: list[dict], *, trace: Path | None = None, timeout: float | None = None) -> list[dict]:
        """Run `jobs` (see `guest`) in one emulated process; returns each job's metadata."""
        with tempfile.TemporaryDirectory(prefix="edgeq-aarch64-") as tmp:
            spec = Path(tmp) / "jobs.json"
            spec.write_text(json.dumps({"site": str(self.site), "jobs": jobs}))
            out = self.python_call(cpu, str(Path(__file__).resolve()), "guest", str(spec), trace=trace,
                                   timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])


def setup(root: Path | None = None, *, ort_version: str | None = None, numpy_version: str | None = None,
          mirror: str | None = None, log=_log) -> Emulator:
    """Set the emulation up from nothing (each step skipped when already done)."""
    root = Path(root or default_root())
    root.mkdir(parents=True, exist_ok=True)
    ort_version = ort_version or _host_version("onnxruntime")
    numpy_version = numpy_version or _host_version("numpy")
    try:
        emulator = Emulator.load(root)
        if emulator.info.get("onnxruntime") == ort_version and emulator.qemu.exists() and emulator.python.exists():
            return emulator
    except SetupError:
        pass
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SetupError("the aarch64 emulation needs Debian's apt-get and dpkg-deb on the host")
    release = _os_release()
    codename = release.get("VERSION_CODENAME")
    if release.get("ID") != "debian" or not codename:
        raise SetupError(f"the aarch64 emulation is set up from Debian packages; this host is {release.get('ID')!r}")
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    if not Path(keyring).exists():
        raise SetupError(f"{keyring} is missing: install the debian-archive-keyring package")
    mirror = mirror or os.environ.get("EDGEQ_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    apt = _Apt(root, codename, mirror, keyring)
    log(f"aarch64 setup in {root}: apt-get update ({codename}, arm64 + amd64 lists, private state)")
    apt.get("update", what="apt-get update (is deb.debian.org reachable?)")

    qemu = _setup_qemu(root, apt, log)
    python = _setup_sysroot(root, apt, log)
    python_version = re.search(r"python(\d+\.\d+)$", python).group(1)
    _setup_wheels(root, python_version, ort_version, numpy_version, log)
    qemu_version = _run([str(root / qemu), "--version"], "qemu --version").stdout.splitlines()[0]
    info = {"debian": codename, "qemu": qemu, "qemu_version": qemu_version, "python": python,
            "python_version": python_version, "onnxruntime": ort_version,
            "numpy": _installed_version(root / "site", "numpy"), "created": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                          time.gmtime())}
    (root / "ready.json").write_text(json.dumps(info, indent=2))
    emulator = Emulator.load(root)
    probe = emulator.python_call("cortex-a76", "-c", "import sys; sys.path.insert(0, %r); import numpy, "
                                 "onnxruntime, platform; print(platform.machine(), onnxruntime.__version__)"
                                 % str(emulator.site), timeout=300).split()
    if probe[0] != "aarch64" or probe[1] != ort_version:
        raise SetupError(f"the emulated python reports {probe}, expected aarch64 and onnxruntime {ort_version}")
    log(f"aarch64 ready: {qemu_version}; python {python_version}; onnxruntime {ort_version}; numpy {info['numpy']}")
    return emulator


def _host_version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _installed_version(site: Path, package: str) -> str:
    found = sorted(site.glob(f"{package}-*.dist-info"))
    return found[0].name[len(package) + 1:-len(".dist-info")] if found else "?"


def _setup_qemu(root: Path, apt: _Apt, log) -> str:
    """Debian's static qemu-aarch64, the newest the suite and its backports offer."""
    target = root / "qemu"
    done = target / ".complete"
    if done.exists():
        return done.read_text().strip()
    if target.exists():  # an interrupted earlier attempt
        shutil.rmtree(target)
    host_arch = _run(["dpkg", "--print-architecture"], "dpkg --print-architecture").stdout.strip()
    best = None
    for package in ("qemu-user", "qemu-user-static"):
        for line in apt.cache("madison", f"{package}:{host_arch}", what=f"apt-cache madison {package}").splitlines():
            version = line.split("|")[1].strip()
            if best is None or _deb_newer(version, best[1]):
                best = (package, version)
    if best is None:
        raise SetupError("no qemu-user package found in the Debian lists")
    package, version = best
    if _version_tuple(version.split(":")[-1]) < MIN_QEMU:
        raise SetupError(f"the newest qemu-user is {version}; neoverse-n2 needs QEMU >= {'.'.join(map(str, MIN_QEMU))}")
    log(f"downloading {package} {version} ({host_arch})")
    downloads = root / "downloads"
    downloads.mkdir(exist_ok=True)
    apt.get("download", f"{package}:{host_arch}={version}", what=f"apt-get download {package}", cwd=downloads)
    (deb,) = sorted(downloads.glob(f"{package}_*_{host_arch}.deb"))
    _extract(deb, target)
    deb.unlink()
    for name in ("usr/bin/qemu-aarch64", "usr/bin/qemu-aarch64-static"):
        if (target / name).exists():
            # keep the one binary we run; the package holds every architecture's (370 MB)
            for other in (target / "usr" / "bin").iterdir():
                if other.name != Path(name).name and not other.is_symlink():
                    other.unlink()
            done.write_text(f"qemu/{name}")
            return f"qemu/{name}"
    raise SetupError(f"{package} {version} holds no qemu-aarch64 binary")


def _deb_newer(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0


def _setup_sysroot(root: Path, apt: _Apt, log) -> str:
    """Debian's arm64 python3 (+ libstdc++6 for onnxruntime) unpacked into root/sysroot."""
    sysroot = root / "sysroot"
    done = sysroot / ".complete"
    if done.exists():
        return done.read_text().strip()
    if sysroot.exists():  # an interrupted earlier attempt
        shutil.rmtree(sysroot)
    log("downloading Debian's arm64 python3 and libstdc++6 with their dependencies")
    apt.get("install", "--download-only", "--no-install-recommends", "-y", "python3:arm64", "libstdc++6:arm64",
            what="apt-get install --download-only python3:arm64")
    archives = apt.dir / "cache" / "archives"
    debs = sorted(archives.glob("*_arm64.deb")) + sorted(archives.glob("*_all.deb"))
    if not debs:
        raise SetupError("apt-get downloaded no arm64 packages")
    for deb in debs:
        _extract(deb, sysroot)
    apt.get("clean", what="apt-get clean")
    found = sorted(p for p in (sysroot / "usr" / "bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name))
    if not found:
        raise SetupError("the arm64 packages hold no python3.X binary")
    python = str(found[-1].relative_to(sysroot))
    done.write_text(python)
    return python


def _setup_wheels(root: Path, python_version: str, ort_version: str, numpy_version: str, log) -> None:
    site = root / "site"
    if _installed_version(site, "onnxruntime") == ort_version:
        return
    if site.exists():
        shutil.rmtree(site)
    tag = python_version.replace(".", "")
    base = [sys.executable, "-m", "pip", "install", "-q", "--target", str(site), "--only-binary=:all:",
            "--implementation", "cp", "--python-version", python_version, "--abi", f"cp{tag}",
            "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
            "--platform", "manylinux2014_aarch64"]
    log(f"pip: onnxruntime=={ort_version} and numpy for manylinux aarch64 / cp{tag}")
    try:
        _run(base + [f"onnxruntime=={ort_version}", f"numpy=={numpy_version}"], "pip install (aarch64 wheels)")
    except SetupError:  # the host's numpy may have no wheel for the sysroot's Python
        _run(base + [f"onnxruntime=={ort_version}", "numpy"], "pip install (aarch64 wheels)")


# ---- host-side helpers ----------------------------------------------------------------------


def save_samples(path: Path, samples: list[dict]) -> None:
    """Write samples for `run`: one sample as plain keys, several as s<i>/<name>."""
    import numpy as np

    if len(samples) == 1:
        np.savez(path, **samples[0])
    else:
        np.savez(path, **{f"s{i:04d}/{k}": v for i, feed in enumerate(samples) for k, v in feed.items()})


def load_samples(path: Path) -> list[dict]:
    import numpy as np

    with np.load(path) as data:
        keys = list(data.keys())
        if not keys or "/" not in keys[0]:
            return [{k: data[k] for k in keys}]
        samples: dict[str, dict] = {}
        for key in keys:
            index, _, name = key.partition("/")
            samples.setdefault(index, {})[name] = data[key]
        return [samples[i] for i in sorted(samples)]


def run_samples(emulator: Emulator, cpu: str, model: Path, samples: list[dict], *, threads: int = 1,
                session_config: dict[str, str] | None = None, optimized_model: Path | None = None,
                optimization: str = "all", timeout: float | None = None) -> tuple[list[dict], dict]:
    """Outputs of `model` on each sample under the emulated `cpu`, and the run's metadata."""
    with tempfile.TemporaryDirectory(prefix="edgeq-aarch64-io-") as tmp:
        inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        save_samples(inputs, samples)
        job = {"model": str(Path(model).resolve()), "inputs": str(inputs), "outputs": str(outputs),
               "threads": threads, "session_config": session_config or {},
               "optimized_model": str(optimized_model) if optimized_model else None, "optimization": optimization}
        (meta,) = emulator.run(cpu, [job], timeout=timeout)
        results = load_samples(outputs)
    return results, meta


# Encodings of the Armv8.2+ instructions QEMU's disassembler prints as `.byte` (mask, value, name),
# from the Arm Architecture Reference Manual (A64 SIMD three-same-extra / by-element / SVE classes).
_ENCODINGS = (
    (0xBFE0FC00, 0x0E809400, "sdot"), (0xBFE0FC00, 0x2E809400, "udot"),            # vector
    (0xBFC0F400, 0x0F80E000, "sdot"), (0xBFC0F400, 0x2F80E000, "udot"),            # by element
    (0xBFE0FC00, 0x0E809C00, "usdot"), (0xBFC0F400, 0x0F80F000, "usdot"),          # i8mm
    (0xBFC0F400, 0x0F00F000, "usdot"),                                             # sudot (same unit)
    (0xFFE0FC00, 0x4E80A400, "smmla"), (0xFFE0FC00, 0x6E80A400, "ummla"), (0xFFE0FC00, 0x4E80AC00, "usmmla"),
    (0xFFE0FC00, 0x45009800, "smmla"), (0xFFE0FC00, 0x45C09800, "ummla"), (0xFFE0FC00, 0x45809800, "usmmla"),
    (0xFFE0FC00, 0x6E40EC00, "bfmmla"),
    (0xBFE0FC00, 0x0E400C00, "fmla.8h"), (0xBFC0F400, 0x0F001000, "fmla.8h"),       # fp16 vector / element
    (0xFFE0FC00, 0x44800000, "sdot"), (0xFFE0FC00, 0x44800400, "udot"),            # SVE
    (0xFFE0001C, 0xA0800000, "smopa"), (0xFFE0001C, 0x80800000, "fmopa"),          # SME
)


def count_instructions(trace: Path) -> Counter:
    """Kernel-revealing instructions among those QEMU translated (each translated block once)."""
    counts: Counter = Counter()
    pattern = re.compile(r"^0x[0-9a-f]+:\s+([0-9a-f]{8})\s+(\S+)\s*(.*)$")
    with open(trace, errors="replace") as lines:
        for line in lines:
            match = pattern.match(line)
            if not match:
                continue
            word, mnemonic, operands = int(match.group(1), 16), match.group(2), match.group(3)
            name = next((n for mask, value, n in _ENCODINGS if word & mask == value), None)
            if name is None:
                name = mnemonic
                if mnemonic == "fmla":
                    name += ".8h" if (".8h" in operands or ".4h" in operands) else ".4s"
            if name in KERNEL_INSTRUCTIONS:
                counts[name] += 1
    return counts


def probe(emulator: Emulator, cpu: str, model: Path, samples: list[dict], *, session_config=None) -> dict:
    """Which kernel instructions ran for `model` on `cpu`: those QEMU translated while creating the
    session and running it, minus those of creating the session alone."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="edgeq-aarch64-probe-") as tmp:
        inputs = Path(tmp) / "in.npz"
        save_samples(inputs, samples)
        for run_it in (False, True):
            trace = Path(tmp) / f"trace-{run_it}.log"
            job = {"model": str(Path(model).resolve()), "inputs": str(inputs), "outputs": str(Path(tmp) / "o.npz"),
                   "threads": 1, "session_config": session_config or {}, "skip_run": not run_it}
            emulator.run(cpu, [job], trace=trace)
            result[run_it] = count_instructions(trace)
    run, base = result[True], result[False]
    return {k: run[k] - base.get(k, 0) for k in sorted(run) if run[k] - base.get(k, 0) > 0}


# ---- guest side (runs inside the emulated aarch64 python) ------------------------------------


def guest(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["site"])
    import platform

    import numpy as np
    import onnxruntime as ort

    metas = []
    for job in spec["jobs"]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(job.get("threads", 1))
        options.inter_op_num_threads = 1
        for key, value in job.get("session_config", {}).items():
            options.add_session_config_entry(key, str(value))
        if job.get("optimized_model"):
            options.optimized_model_filepath = job["optimized_model"]
        level = job.get("optimization", "all")
        options.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
        start = time.perf_counter()
        session = ort.InferenceSession(job["model"], options, providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - start
        outputs, run_s = {}, 0.0
        if not job.get("skip_run"):
            samples = load_samples(Path(job["inputs"]))
            names = [o.name for o in session.get_outputs()]
            for i, feed in enumerate(samples):
                start = time.perf_counter()
                values = session.run(None, feed)
                run_s += time.perf_counter() - start
                prefix = f"s{i:04d}/" if len(samples) > 1 else ""
                outputs.update({prefix + n: v for n, v in zip(names, values)})
            np.savez(job["outputs"], **outputs)
        metas.append({"machine": platform.machine(), "onnxruntime": ort.__version__, "numpy": np.__version__,
                      "load_s": load_s, "run_s": run_s})
    print(json.dumps(metas))


# ---- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="emulation folder (default: %(default)s)")
    sub = parser.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("setup", help="set the emulation up (idempotent)")
    s.add_argument("--onnxruntime", default=None, help="onnxruntime version (default: the host's)")
    s = sub.add_parser("cpuinfo", help="features of each emulated CPU")
    s.add_argument("--cpu", action="append", default=None)
    for verb in ("run", "probe"):
        s = sub.add_parser(verb, help="run a model (npz in, npz out)" if verb == "run" else
                           "which kernel instructions a model's run translated")
        s.add_argument("--cpu", required=True, help=f"QEMU -cpu ({', '.join(CPUS)}, ...)")
        s.add_argument("model", type=Path)
        s.add_argument("inputs", type=Path)
        s.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                       help="ORT session config entry")
        if verb == "run":
            s.add_argument("-o", "--output", type=Path, required=True)
            s.add_argument("--threads", type=int, default=1)
            s.add_argument("--optimized", type=Path, default=None, help="save ORT's optimized graph here")
            s.add_argument("--optimization", choices=("disable", "basic", "extended", "all"), default="all",
                           help="ORT graph optimization level (default: all, ORT's default)")
    sub.add_parser("guest").add_argument("spec")
    args = parser.parse_args(argv)

    if args.verb == "guest":
        guest(args.spec)
        return 0
    try:
        if args.verb == "setup":
            setup(args.root, ort_version=args.onnxruntime)
            return 0
        emulator = Emulator.load(args.root)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.verb == "cpuinfo":
        for cpu in args.cpu or CPUS:
            features = set(emulator.features(cpu)["features"])
            print(f"{cpu:12s} " + " ".join(f for f in ARCH_FEATURES if f in features))
        return 0
    config = dict(item.split("=", 1) for item in args.config)
    samples = load_samples(args.inputs)
    if args.verb == "probe":
        counts = probe(emulator, args.cpu, args.model, samples, session_config=config)
        for name, count in counts.items():
            print(f"{name:10s} {count:6d}  {KERNEL_INSTRUCTIONS[name]}")
        return 0
    outputs, meta = run_samples(emulator, args.cpu, args.model, samples, threads=args.threads, session_config=config,
                                optimized_model=args.optimized, optimization=args.optimization)
    save_samples(args.output, outputs)
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
