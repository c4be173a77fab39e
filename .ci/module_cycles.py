#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a cycle.

For every crate's `src/` it maps each file to its module path, reads the `crate::…` and
`super::…` paths in the file's code (test modules after `#[cfg(test)]` are left out: tests may
reach anywhere), resolves each to the longest known module, and looks for cycles twice: between
files (modules) and between the crate's top-level rooms (`balance`, `proxy`, …). A room's own
`mod.rs` declaring its children is not an import. Prints the cycles it finds and exits 1.

Usage: module_cycles.py CRATE_DIR...
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super)::((?:[a-z_][a-z0-9_]*::)*[a-z_][a-z0-9_]*|\{[^}]*\})")


def module_of(src: Path, f: Path) -> tuple:
    parts = list(f.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def code_of(f: Path) -> str:
    text = f.read_text()
    cut = text.find("#[cfg(test)]")
    text = text if cut < 0 else text[:cut]
    # Comments name modules without importing them.
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def references(module: tuple, code: str, is_dir_module: bool):
    for m in PATH.finditer(code):
        root, rest = m.group(1), m.group(2)
        if root == "crate":
            base = ()
        else:
            # `super` of a folder's mod.rs is the folder's parent, as of any other file.
            base = module[:-1]
        items = [rest]
        if rest.startswith("{"):
            items = [i.strip() for i in rest[1:-1].split(",")]
        for item in items:
            item = item.split(" as ")[0].strip()
            if not item or item == "self":
                continue
            yield base + tuple(p for p in item.split("::") if p and p != "self")


def cycles(edges: dict) -> list:
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    return found


def check(crate: Path) -> list:
    src = crate / "src"
    files = [f for f in src.rglob("*.rs") if "bin" not in f.relative_to(src).parts]
    modules = {module_of(src, f): f for f in files}
    file_edges, room_edges = {}, {}
    for module, f in modules.items():
        if f.name == "main.rs":
            continue
        for path in references(module, code_of(f), f.name == "mod.rs"):
            target = max((m for m in modules if path[: len(m)] == m), key=len, default=None)
            if target is None or target == module or not target:
                continue
            # A module naming its own descendants (re-exports, `use child::X`) is not a cycle risk.
            if target[: len(module)] == module:
                continue
            file_edges.setdefault(module, set()).add(target)
            if module and target[0] != module[0]:
                room_edges.setdefault(module[0], set()).add(target[0])
    problems = []
    for c in cycles(file_edges):
        problems.append(f"{crate}: modules " + " -> ".join("::".join(m) or "crate" for m in c))
    for c in cycles(room_edges):
        problems.append(f"{crate}: rooms " + " -> ".join(c))
    return problems


def main() -> int:
    problems = [p for crate in sys.argv[1:] for p in check(Path(crate))]
    for p in problems:
        print(f"import cycle: {p}")
    if not problems:
        print(f"no import cycles in {' '.join(sys.argv[1:])}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
