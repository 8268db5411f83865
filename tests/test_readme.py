"""The README's commands, endpoints, settings and links are real.

Every `lpnet` command line of a shell block parses with the CLI's own parser; every option the
command table shows belongs to its command; every endpoint of the REST table and every path a curl
line calls is a route of the app with that method; every variable of the configuration table is a
setting (or one the agent and the client read); every `make` target exists; every relative link
reaches a file and, with an anchor, one of its headings. The Python blocks run elsewhere:
tests/lpnet/test_public_api.py runs the fit, example and verify blocks in a row, as a reader would;
the example and the client block are docs/python-api.md's two, verbatim, which
tests/service/test_client.py runs against a live server.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
from pydantic import BaseModel

from service.cli import build_parser
from service.config import Settings
from service.main import create_app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Variables read outside `Settings`: by the agent and the client (`LPNET_SERVER`, ...), by the
# command line before settings exist (`LPNET_ENV_FILE`).
NON_SETTINGS = {
    "LPNET_SERVER",
    "LPNET_API_KEY",
    "LPNET_AGENT_DEVICE",
    "LPNET_AGENT_STATE_DIR",
    "LPNET_ENV_FILE",
}


def blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.DOTALL)


def shell_lines(markdown: str) -> list[str]:
    """The commands of the shell blocks: continued and open-quoted lines joined, comments dropped."""
    lines: list[str] = []
    for block in blocks(markdown, "bash"):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending = f"{pending} {line}" if pending else line
            try:
                shlex.split(pending, comments=True)
            except ValueError:  # a quote opened on this line closes on a later one
                continue
            command = pending.split(" # ")[0].strip()
            pending = ""
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def lpnet_commands(markdown: str) -> list[list[str]]:
    """The arguments of every `lpnet` invocation in the shell blocks (also inside `$(...)`)."""
    pattern = re.compile(r"(?:^|\$\(|&&|;|\|)\s*(?:\.venv/bin/)?lpnet\s+([^)&|;]*)")
    return [shlex.split(match) for line in shell_lines(markdown) for match in pattern.findall(line)]


def subcommand_parser(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The deepest parser `words` name (`device add` -> that parser) and the words it leaves."""
    parser = build_parser()
    while words:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or words[0] not in subparsers[0].choices:
            break
        parser, words = subparsers[0].choices[words[0]], words[1:]
    return parser, words


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_every_lpnet_command_line_parses() -> None:
    commands = lpnet_commands(README)
    assert len(commands) >= 8, commands
    for arguments in commands:
        parser = build_parser()
        if arguments == ["--help"]:
            continue
        try:
            parser.parse_args(arguments)
        except SystemExit as exc:
            pytest.fail(f"README: `lpnet {shlex.join(arguments)}` does not parse (exit {exc.code})")


def test_the_command_table_names_real_commands_and_options() -> None:
    section = README.split("### Commands", 1)[1].split("\n### ", 1)[0]
    rows = [row for row in section.splitlines() if row.startswith("| `lpnet")]
    assert len(rows) >= 10
    for row in rows:
        for usage in re.findall(r"`(lpnet [^`]+)`", row.split("|")[1]):
            words = usage.split()[1:]
            names = []
            for word in words:
                if not re.fullmatch(r"[a-z][a-z-]*", word):
                    break
                names.append(word)
            parser, _ = subcommand_parser(names)
            assert parser.prog.split()[1:] == names or not names, f"README names an unknown command: {usage}"
            for option in re.findall(r"--[a-z][a-z-]*", usage):
                assert option in option_strings(parser), f"README: {option} is no option of `{parser.prog}`"


def app_routes() -> set[tuple[str, str]]:
    """(method, path with every parameter as `{}`) for every route of the app, documented or not."""
    app = create_app(Settings(database_url="sqlite://", first_run={"enabled": False}))
    routes = {
        (method.upper(), re.sub(r"\{[^}]+\}", "{}", path))
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    for route in app.routes:
        for method in getattr(route, "methods", None) or ():
            routes.add((method, re.sub(r"\{[^}]+\}", "{}", getattr(route, "path", ""))))
    return routes


def is_route(method: str, path: str, routes: set[tuple[str, str]]) -> bool:
    """Whether some route of `method` matches `path`, a parameter matching any one segment."""
    path = path.split("?")[0].split("[")[0]
    return any(
        method == verb and re.fullmatch(re.escape(route).replace(re.escape("{}"), "[^/]+"), path)
        for verb, route in routes
    )


def test_the_rest_table_and_the_curl_lines_call_real_routes() -> None:
    routes = app_routes()
    section = README.split("### REST endpoints", 1)[1].split("\n### ", 1)[0]
    checked = 0
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        method = "GET"
        for item in re.findall(r"`([^`]+)`", row.split("|")[1]):
            parts = re.sub(r"\{[^}]+\}", "{}", item).split()
            if parts[0] in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                method, path = parts[0], parts[1]
            else:
                path = parts[0]
            if path.startswith("..."):
                continue
            if not path.startswith("/"):
                path = "/v1/agent/tasks/{id}/" + path.lstrip(".")
            elif not path.startswith(("/v1", "/healthz", "/readyz", "/docs", "/openapi.json", "/metrics")):
                path = "/v1" + path
            assert is_route(method, path, routes), f"README's REST table: {method} {path} is no route"
            checked += 1
    assert checked >= 25
    calls = 0
    for line in shell_lines(README):
        if not line.startswith("curl"):
            continue
        words = shlex.split(line.replace("$API", "http://127.0.0.1:8000"))
        method = words[words.index("-X") + 1] if "-X" in words else "GET"
        [url] = [w for w in words if w.startswith("http") or w.startswith("127.0.0.1")]
        path = "/" + url.split("://")[-1].split("/", 1)[1]
        assert is_route(method, path, routes), f"README: `{line}` calls no route"
        calls += 1
    assert calls >= 6


def setting_names(model: type[BaseModel], prefix: str) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= setting_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def test_every_configuration_variable_is_a_setting() -> None:
    known = setting_names(Settings, "LPNET_") | NON_SETTINGS
    section = README.split("### Configuration", 1)[1].split("\n### ", 1)[0]
    checked = 0
    for row in section.splitlines():
        if not row.startswith("| `LPNET_"):
            continue
        group = ""
        for item in re.findall(r"`(LPNET_[A-Z0-9_]+|__[A-Z0-9_]+)`", row.split("|")[1]):
            if item.startswith("__"):
                name = group + item.removeprefix("__")
            else:
                name = item
                group = item.rsplit("__", 1)[0] + "__" if "__" in item else ""
            assert name in known, f"README's configuration table: {name} is no setting"
            checked += 1
    assert checked >= 20


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE))
    named = set(re.findall(r"`make ([a-z][a-z-]*)", README)) | {
        words[1] for line in shell_lines(README) if (words := line.split())[0] == "make"
    }
    assert {"run", "test"} <= named
    assert named <= targets, named - targets


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_relative_links_reach_files_and_headings() -> None:
    documents = {ROOT / "README.md": README} | {p: p.read_text() for p in (ROOT / "docs").glob("*.md")}
    checked = 0
    for source, text in documents.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            path = (source.parent / file_part).resolve() if file_part else source
            assert path.exists(), f"{source.name} links to {target}, which does not exist"
            if anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
                assert anchor in {slug(h) for h in headings}, (
                    f"{source.name} links to a missing heading: {target}"
                )
            checked += 1
    assert checked >= 20


def test_the_readme_example_is_the_one_the_api_test_runs() -> None:
    documented = blocks((ROOT / "docs" / "python-api.md").read_text(), "python")
    readme = blocks(README, "python")
    assert len(readme) >= 3
    assert readme[1] == documented[0]
    assert readme[3] == documented[1]
