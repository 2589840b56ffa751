"""The README and docs/ stay true: short, every link resolves inside the repo, every job command parses.

The flags are checked against each job's own argparse parser (built by its ``parse`` function,
stopped before it parses), so a renamed or removed flag fails here, not in a user's shell.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 300

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
JOB = re.compile(r"python -m jobs\.(\w+)")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")


def _docs() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, re.MULTILINE)}


def link_problems(path: Path) -> list[str]:
    """Relative links of ``path`` that do not resolve to a file (or heading) inside the repo."""
    problems = []
    for target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}: ({target})"
        if not dest.is_relative_to(ROOT):
            problems.append(f"{where} points outside the repository")
        elif not dest.is_file():
            problems.append(f"{where} names no file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def job_commands(text: str) -> list[tuple[str, list[str]]]:
    """(job, its --flags) for every ``python -m jobs.X`` in the code blocks and inline code of ``text``."""
    snippets = [block.replace("\\\n", " ") for block in FENCE.findall(text)]
    snippets += [" ".join(span.split()) for span in INLINE.findall(FENCE.sub("", text))]
    commands = []
    for snippet in snippets:
        for line in snippet.splitlines():
            line = re.split(r"\s#", line)[0]  # a trailing shell comment
            for m in JOB.finditer(line):
                rest = re.split(r"\s(?:\||&&|;|python -m)\s", line[m.end() :])[0]
                commands.append((m.group(1), [f.split("=")[0] for f in FLAG.findall(rest)]))
    return commands


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def job_flags(job: str, monkeypatch) -> set[str]:
    """The --flags the job's parser accepts, read from its usage line (suppressed ones left out)."""

    def stop(parser, *args, **kwargs):
        raise _Built(parser)

    module = importlib.import_module(f"jobs.{job}")
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", stop)
        with pytest.raises(_Built) as built:
            module.parse([])
    return set(FLAG.findall(built.value.parser.format_usage())) | {"--help"}


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines < MAX_README_LINES, f"README.md has {lines} lines, not under {MAX_README_LINES}: move detail to docs/"


@pytest.mark.parametrize("path", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_repo(path):
    assert "../shared" not in path.read_text(), f"{path.relative_to(ROOT)} refers to ../shared, outside the repo"
    assert not link_problems(path), link_problems(path)


def test_link_check_catches_a_broken_link(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Top\n[ok](a.md#top) [gone](missing.md) [up](../x.md) [bad](a.md#nowhere)\n")
    (tmp_path / "x.md").write_text("")
    problems = link_problems(tmp_path / "a.md")
    assert [p.split("(")[1].split(")")[0] for p in problems] == ["missing.md", "../x.md", "a.md#nowhere"]


def test_readme_commands_name_existing_jobs_and_flags(monkeypatch):
    text = README.read_text()
    commands = job_commands(text)
    jobs_named = {job for job in JOB.findall(text)}
    missing = sorted(j for j in jobs_named if not (ROOT / "jobs" / f"{j}.py").is_file())
    assert not missing, f"README names jobs that do not exist: {missing}"
    assert {"ingest", "pretrain", "finetune", "evaluate", "predict", "tune", "study"} <= {j for j, _ in commands}
    known: dict[str, set[str]] = {}
    unknown = []
    for job, flags in commands:
        known.setdefault(job, job_flags(job, monkeypatch))
        unknown += [f"python -m jobs.{job} {flag}" for flag in flags if flag not in known[job]]
    assert not unknown, f"README uses flags the jobs do not have: {sorted(set(unknown))}"


def test_flag_check_catches_an_unknown_flag(monkeypatch):
    text = "```bash\npython -m jobs.evaluate --checkpoint m.pt \\\n    --no-such-flag 1  # --ignored\n```\n"
    [(job, flags)] = job_commands(text)
    assert (job, flags) == ("evaluate", ["--checkpoint", "--no-such-flag"])
    assert "--checkpoint" in job_flags("evaluate", monkeypatch)
    assert "--no-such-flag" not in job_flags("evaluate", monkeypatch)


def test_readme_keeps_the_cluster_command():
    """tests/test_cluster.py submits the README's command: keep it in the README as it runs there."""
    flat = " ".join(README.read_text().replace("\\\n", " ").split())
    assert (
        "ray job submit --address http://<head>:8265 --runtime-env infra/runtime_env.yaml --working-dir . -- "
        "python -m jobs.finetune"
    ) in flat
