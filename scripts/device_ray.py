"""A slim Ray + decord bundle for the GPU machine, which has neither and cannot reach PyPI.

Usually driven by ``scripts/device_ray.sh`` (usage there). Subcommands:

    python scripts/device_ray.py build  [--python 3.12] [--out .device/ray-bundle.tar.xz]   # here
    python scripts/device_ray.py unpack [--bundle ...] [--dest ...] [--no-prune]            # prints exports
    python scripts/device_ray.py check                                                      # smoke test

``build`` runs here (it needs PyPI and the project's .venv, whose Ray and decord versions it
copies); ``unpack`` and ``check`` need only the standard library plus what the bundle carries,
so they run with the GPU machine's own Python.

Facts that shaped this script (Ray 2.60.0, measured on this project's machines):
- A device call carries at most 64 MiB of ignored paths. Ray's cp312 wheel is 79 MB zipped,
  201 MB unpacked: ``_raylet.so`` 44 MB, ``gcs_server`` 41 MB, ``raylet`` 35 MB, ``jars/`` 34 MB.
  Stripped (``strip --strip-unneeded``) and xz'd, the three native binaries are ~20.6 MB.
- What the GPU machine has (Python 3.12, torch 2.11): numpy, pandas, pyarrow, grpcio, protobuf,
  msgpack, aiohttp, click, filelock, fsspec (a torch dependency). Not: Ray, decord, PyYAML,
  jsonschema, requests, pydantic (Train V2 refuses to import without it), packaging (maybe).
- Ray's own requirements (core + the data/train/tune extras) minus the big binaries the device
  already has are bundled as separate wheel folders; ``unpack`` puts a folder on PYTHONPATH only
  when the device lacks that distribution or has a version that a bundled requirement rejects,
  so a bundled copy never shadows a working one.
- strip corrupts libraries that auditwheel patched with patchelf (decord's): those ship unstripped.
- decord 0.6.0 has no cp312 wheel but needs none: its one wheel is ``py3-none-manylinux2010``
  (a ctypes binding to ``libdecord.so``), so the same file serves 3.11 and 3.12.
- Measured (2.60.0): the cp312 bundle is 32.2 MB (30.7 MiB): 242 MB of Ray + decord wheels, less
  54 MB dropped (DROP), 18 ELF files stripped 139.0 -> 92.6 MB, 165 MB unpacked with the deps and
  pytest. The cp311 build of the same (``check-local``) passes ``check`` on this (CPU) machine.
- Ray's runtime-env agent always starts with its vendored aiohttp
  (``ray/_private/runtime_env/agent/thirdparty_files``, 12 MB): kept, its .so files stripped.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / ".device" / "ray-bundle.tar.xz"
MANIFEST = "bundle.json"
# glibc >= 2.28 on the GPU machine (its torch 2.11 wheels are manylinux_2_28); Ray's wheel is 2014
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64")
RAY_EXTRAS = ("data", "train", "tune")  # what the jobs use: Ray Data decode, Train workers, Tune sweeps
# Ray requirements not bundled: big binaries the GPU machine already has, or optional.
NOT_BUNDLED = {
    "numpy": "on the device (torch needs it)",
    "pandas": "on the device",
    "pyarrow": "on the device",
    "grpcio": "on the device",
    "protobuf": "on the device",
    "msgpack": "on the device",
    "aiohttp": "on the device",
    "tensorboardx": "optional: only Tune's TBX logger, which Ray skips with a warning when absent",
}
# Carried besides Ray's requirements (pure Python, pruned on unpack where the device has them).
TOOLS = {"pytest": "to run tests/test_groupnorm.py's CUDA tests there (python -m pytest --noconftest ...)"}
# Parts of the Ray wheel a one-node Train/Tune/Data job never imports: (path glob, why).
DROP = (
    ("ray/jars", "Java workers (cross-language calls); the jobs are Python only -- 34 MB"),
    ("ray/rllib", "reinforcement learning; Tune's registry imports it lazily and copes with ImportError"),
    ("ray/serve", "model serving; only `ray serve` CLI and the dashboard's serve module import it, lazily"),
    ("ray/llm", "LLM batch/serving; only ray.data.llm imports it"),
    ("ray/data/llm.py", "entry point of ray.llm (dropped above); ray.data does not import it"),
    (
        "ray/dashboard/client/build",
        "the dashboard's web UI (JS, CSS, a 6.6 MB source map); the dashboard's "
        "Python stays (job server; Train V2's state schema imports it)",
    ),
    ("ray/tune/examples", "example scripts"),
    ("ray/train/examples", "example scripts"),
    ("ray/**/tests", "test suites (none in 2.60's wheel)"),
    ("**/*.pyi", "type stubs: for type checkers only"),
    ("**/*.pxd", "Cython declarations: for building only"),
    ("**/*.pxi", "Cython includes: for building only"),
    ("**/*.h", "C headers: for building only"),
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _pip_download(specs: list[str], dest: Path, py: str, *, deps: bool, constraints: Path | None = None) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--only-binary=:all:",
        "--python-version",
        py,
        "--implementation",
        "cp",
        "-d",
        str(dest),
    ]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    if not deps:
        cmd.append("--no-deps")
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    _run(cmd + specs)


def _wheel_requires(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))


def _ray_requirements(whl: Path) -> set[str]:
    """Names Ray requires in core + RAY_EXTRAS (markers other than `extra` are for 3.12 here: all hold)."""
    names = set()
    for req in _wheel_requires(whl):
        extra = re.search(r"extra\s*==\s*\"([^\"]+)\"", req)
        if extra is None or extra.group(1) in RAY_EXTRAS:
            names.add(_requirement_name(req))
    return names


def _drop(site: Path) -> list[tuple[str, str, int]]:
    """Delete DROP's paths under site; returns (glob, why, bytes freed). A named path that is gone fails."""
    dropped = []
    for pattern, why in DROP:
        hits = sorted(site.glob(pattern))
        if not hits and "*" not in pattern:
            raise SystemExit(f"build: nothing matches {pattern!r} in the Ray wheel -- Ray moved it; update DROP")
        freed = 0
        for p in hits:
            if not p.exists():  # inside a folder already removed
                continue
            freed += _size(p)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        dropped.append((pattern, why, freed))
    return dropped


def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _is_elf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _auditwheel_patched(f: Path) -> bool:
    """A library auditwheel rewrote with patchelf: one in a `<pkg>.libs/` folder or with an rpath into one.

    strip corrupts those (decord's libdecord.so, 12.5 -> 3.1 MB, then fails to load with "ELF load
    command address/offset not page-aligned"), so they ship as they are."""
    if any(part.endswith(".libs") for part in f.parts):
        return True
    dyn = subprocess.run(["readelf", "-d", str(f)], capture_output=True, text=True).stdout
    return any(("RPATH" in line or "RUNPATH" in line) and ".libs" in line for line in dyn.splitlines())


def _strip(tree: Path) -> tuple[int, int, int]:
    """strip --strip-unneeded every ELF file (Ray's binaries, extension modules) but auditwheel's."""
    before = after = n = 0
    for f in sorted(tree.rglob("*")):
        if f.is_file() and not f.is_symlink() and _is_elf(f) and not _auditwheel_patched(f):
            before += f.stat().st_size
            subprocess.run(["strip", "--strip-unneeded", str(f)], check=True)
            after += f.stat().st_size
            n += 1
    return n, before, after


def _test_clip(path: Path) -> bool:
    """A tiny real H.264 clip for `check` to decode with decord (made with PyAV, here only)."""
    try:
        import av
        import numpy as np
    except ImportError:
        return False
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(8):
            img = np.full((32, 32, 3), 16 * i, dtype=np.uint8)
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode())
    return True


def build(args: argparse.Namespace) -> None:
    py = args.python
    tag = "cp" + py.replace(".", "")
    ray_ver = importlib.metadata.version("ray")
    decord_ver = importlib.metadata.version("decord")
    cache = ROOT / ".device" / f"wheels-{tag}"
    cache.mkdir(parents=True, exist_ok=True)
    _pip_download([f"ray=={ray_ver}"], cache, py, deps=False)
    _pip_download([f"decord=={decord_ver}"], cache, py, deps=False)
    ray_whl = next(cache.glob(f"ray-{ray_ver}-{tag}-*.whl"))
    decord_whl = next(cache.glob(f"decord-{decord_ver}-*.whl"))

    # Ray's requirements we carry, pinned to this venv's versions (the tested ones) where it has them
    wanted = sorted(_ray_requirements(ray_whl) - set(NOT_BUNDLED)) + sorted(TOOLS)
    local = {_norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    deps_dir = cache / "deps"
    shutil.rmtree(deps_dir, ignore_errors=True)
    deps_dir.mkdir()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c:
        c.write("".join(f"{n}=={v}\n" for n, v in sorted(local.items()) if n not in ("ray", "clman")))
    try:
        _pip_download(wanted, deps_dir, py, deps=True, constraints=Path(c.name))
    finally:
        os.unlink(c.name)
    dep_whls = sorted(w for w in deps_dir.glob("*.whl") if _norm(w.name.split("-")[0]) not in NOT_BUNDLED)

    with tempfile.TemporaryDirectory(dir=ROOT / ".device") as tmp:
        stage = Path(tmp) / "bundle"
        site = stage / "site"
        for whl in (ray_whl, decord_whl):
            zipfile.ZipFile(whl).extractall(site)
        wheel_bytes = _size(site)
        dropped = _drop(site)
        deps = {}
        for whl in dep_whls:
            name, version = whl.name.split("-")[:2]
            folder = stage / "deps" / _norm(name)
            zipfile.ZipFile(whl).extractall(folder)
            deps[_norm(name)] = {"version": version, "dir": f"deps/{_norm(name)}", "wheel": whl.name}
        for f in stage.rglob("*"):  # zip extraction drops the mode bits: restore exec on ELF files
            if f.is_file() and _is_elf(f):
                f.chmod(0o755)
        n_elf, elf_before, elf_after = _strip(stage)
        has_clip = _test_clip(stage / "check.mp4")
        manifest = {
            "python": py,
            "ray": ray_ver,
            "decord": decord_ver,
            "wheels": [ray_whl.name, decord_whl.name],
            "deps": deps,
            "dropped": [{"path": p, "why": w, "bytes": b} for p, w, b in dropped],
            "not_bundled": NOT_BUNDLED,
            "tools": TOOLS,
            "check_clip": has_clip,
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

        out = (
            Path(args.out)
            if args.out
            else ROOT / ".device" / ("ray-bundle.tar.xz" if py == "3.12" else f"ray-bundle-{tag}.tar.xz")
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        raw = _size(stage)
        _write_tar_xz(stage, out)

    mb = 1e6
    print(f"\nRay {ray_ver} + decord {decord_ver} for {tag} manylinux x86_64")
    print(f"  Ray + decord wheels unpacked   {wheel_bytes / mb:7.1f} MB")
    for p, w, b in dropped:
        print(f"  - {p:<28} {b / mb:7.1f} MB  {w}")
    print(f"  strip --strip-unneeded: {n_elf} ELF files {elf_before / mb:.1f} -> {elf_after / mb:.1f} MB")
    print("  deps: " + ", ".join(f"{n} {d['version']}" for n, d in deps.items()))
    print(f"  bundle unpacked                {raw / mb:7.1f} MB")
    print(
        f"  {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}  {out.stat().st_size / mb:.1f} MB "
        f"({out.stat().st_size / 2**20:.1f} MiB of the 64 MiB carry)"
    )


def _write_tar_xz(stage: Path, out: Path) -> None:
    """Reproducible tar (sorted, root-owned, fixed mtime) at xz -9e; written atomically."""

    def norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = 0
        return ti

    tmp = out.with_suffix(".partial")
    with lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for p in sorted(stage.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(stage)), recursive=False, filter=norm)
    tmp.replace(out)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract(bundle: Path, dest: Path) -> None:
    """Extract once per bundle content (a stamp holds its sha256); a half-done extraction is redone."""
    stamp = dest / ".bundle-sha256"
    digest = _digest(bundle)
    if stamp.exists() and stamp.read_text() == digest:
        return
    shutil.rmtree(dest, ignore_errors=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(bundle, "r:xz") as tar:
        tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
    (tmp / ".bundle-sha256").write_text(digest)
    tmp.rename(dest)


def _needed_deps(dest: Path, manifest: dict) -> tuple[list[str], list[str]]:
    """Bundled dep folders the device needs: its own copy is missing or fails a bundled requirement."""
    root = str(dest.resolve())
    device_path = [p for p in sys.path if not os.path.abspath(p or ".").startswith(root)]
    sys.path.insert(0, str(dest / manifest["deps"]["packaging"]["dir"]))  # for parsing, whatever the device has
    from packaging.requirements import Requirement
    from packaging.version import Version

    # every requirement that Ray (core + extras) or a bundled dep puts on a distribution
    metas = [next((dest / "site").glob("ray-*.dist-info")) / "METADATA"]
    metas += [next((dest / d["dir"]).glob("*.dist-info")) / "METADATA" for d in manifest["deps"].values()]
    reqs: dict[str, list] = {}
    for meta in metas:
        is_ray = meta.parent.name.startswith("ray-")
        for line in meta.read_text().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            envs = [{"extra": e} for e in (("",) + RAY_EXTRAS if is_ray else ("",))]
            if req.marker is None or any(req.marker.evaluate(e) for e in envs):
                reqs.setdefault(_norm(req.name), []).append(req.specifier)
    keep, skip = [], []
    for name, d in sorted(manifest["deps"].items()):
        found = next(iter(importlib.metadata.distributions(name=name, path=device_path)), None)
        ok = found is not None and all(Version(found.version) in s for s in reqs.get(name, []))
        (skip if ok else keep).append(f"{name} {found.version if ok else d['version']}")
    sys.path.pop(0)
    return keep, skip


def unpack(args: argparse.Namespace) -> None:
    bundle, dest = Path(args.bundle), Path(args.dest)
    if not bundle.is_file():
        raise SystemExit(
            f"unpack: no bundle at {bundle} -- build it with `bash scripts/device_ray.sh build` "
            f'and carry it (carry=[".device/ray-bundle.tar.xz"])'
        )
    _extract(bundle, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    want = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != want:
        raise SystemExit(
            f"unpack: the bundle is for Python {manifest['python']}, this is {want}: "
            f"rebuild with `scripts/device_ray.sh build --python {want}`"
        )
    if args.no_prune:
        keep, skip = [f"{n} {d['version']}" for n, d in sorted(manifest["deps"].items())], []
    else:
        keep, skip = _needed_deps(dest, manifest)
    dirs = [dest / "site"] + [dest / manifest["deps"][k.split()[0]]["dir"] for k in keep]
    print(f"# ray {manifest['ray']} + decord {manifest['decord']} from {dest}", file=sys.stderr)
    print(
        f"# bundled deps used: {', '.join(keep) or 'none'}; the device's own: {', '.join(skip) or 'none'}",
        file=sys.stderr,
    )
    old = [
        p
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if p and not os.path.abspath(p).startswith(str(dest.resolve()))
    ]
    path = os.pathsep.join([str(d.resolve()) for d in dirs] + old)
    print(f"export PYTHONPATH='{path}'")
    print("export RAY_USAGE_STATS_ENABLED=0")  # no network on the GPU machine: don't try to report
    print("export RAY_TRAIN_V2_ENABLED=1")  # as clman/launch/session.py


def check(args: argparse.Namespace) -> None:
    """ray.init, a task, a one-worker TorchTrainer, a Ray Data map_batches, a decord read -- from the bundle."""
    # as clman/launch/session.py's LOCAL_TRAIN_ENV: a one-node Train run without the watchers it does not need
    for key, value in {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_TRAIN_METRICS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }.items():
        os.environ.setdefault(key, value)
    import ray

    bundle_root = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    print(f"ray {ray.__version__} from {ray.__file__}")
    assert bundle_root and ray.__file__.startswith(bundle_root), f"ray is not the bundle's ({bundle_root})"
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote
        def square(x):
            return x * x

        print("task:", ray.get([square.remote(i) for i in range(4)]))

        import ray.data

        ds = ray.data.range(10).map_batches(lambda b: {"id": b["id"] * 2}, batch_size=4)
        print("data:", sorted(r["id"] for r in ds.take_all()))

        import ray.train
        import ray.train.torch

        def loop(config):
            import torch

            model = ray.train.torch.prepare_model(torch.nn.Linear(4, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            device = ray.train.torch.get_device()
            x, y = torch.randn(16, 4, device=device), torch.randn(16, 1, device=device)
            for epoch in range(2):
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                with tempfile.TemporaryDirectory() as d:  # Train V2 keeps metrics with a checkpoint only
                    torch.save(model.state_dict(), os.path.join(d, "model.pt"))
                    ray.train.report(
                        {"epoch": epoch, "loss": loss.item(), "device": str(device)},
                        checkpoint=ray.train.Checkpoint.from_directory(d),
                    )

        with tempfile.TemporaryDirectory() as tmp:
            trainer = ray.train.torch.TorchTrainer(
                loop,
                scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=args.gpu),
                run_config=ray.train.RunConfig(name="bundle-check", storage_path=tmp),
            )
            result = trainer.fit()
            metrics = result.metrics or {}
            assert result.error is None and metrics.get("epoch") == 1, (result.error, metrics)
            print(
                "train:",
                {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
                "checkpoint:",
                sorted(os.listdir(result.checkpoint.path)),
            )
    finally:
        ray.shutdown()

    import decord

    print(f"decord {decord.__version__} from {decord.__file__}")
    assert decord.__file__.startswith(bundle_root), f"decord is not the bundle's ({bundle_root})"
    clip = Path(bundle_root).parent / "check.mp4"
    if clip.exists():
        vr = decord.VideoReader(io.BytesIO(clip.read_bytes()))
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()
        assert frames.shape == (8, 32, 32, 3), frames.shape
        print(f"decord read {len(vr)} frames {frames.shape}, mean grey levels {frames.mean(axis=(1, 2, 3)).round()}")
    print("bundle check: ok")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download, slim, strip and pack (here; needs PyPI and .venv)")
    b.add_argument(
        "--python",
        default="3.12",
        help="target CPython X.Y; 3.12 = the GPU machine, 3.11 = this machine (to check the bundle here)",
    )
    b.add_argument("--out", help="default .device/ray-bundle.tar.xz (3.12) or .device/ray-bundle-cpXY.tar.xz")
    u = sub.add_parser("unpack", help="extract (once) and print the exports that put it on PYTHONPATH")
    u.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    u.add_argument("--dest", default=str(ROOT / ".device" / "ray"))
    u.add_argument(
        "--no-prune",
        action="store_true",
        help="put every bundled dep on PYTHONPATH, even where this Python has its own (to test them)",
    )
    c = sub.add_parser("check", help="smoke test of the unpacked bundle (run under `device_ray.sh run`)")
    c.add_argument("--num-cpus", type=int, default=1)
    c.add_argument("--gpu", action="store_true", help="the Train worker on a GPU (the device machine)")
    b.set_defaults(func=build)
    u.set_defaults(func=unpack)
    c.set_defaults(func=check)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
