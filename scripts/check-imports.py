#!/usr/bin/env python3
"""Structure checks for src/, fast enough to run before cargo (scripts/test.sh):

1. No import circle between the top-level modules of src/ (`edge`, `relay`, `ops`, `config`,
   ...), and none between the files of one folder (`edge::worker` <-> `edge::connection`).
2. No file in src/ over MAX_LINES lines.
3. No `unsafe` outside UNSAFE_ALLOWED.

How the graph is built: every .rs file under src/ (the bench is its own crate in bench/) is
read with comments, strings and char literals blanked out; then every path that starts with
`crate::`, `super::` (climbing out of the file's module, inline `mod x { }` blocks counted) or,
in main.rs, `ringway::` is resolved to the module it names. `use crate::{a, b::c}` groups count
every item. An edge A -> B means a file of A names something in B. Folder level: the nodes are
the files (or sub-folders) of one folder; a folder's own mod.rs is its interface and not a
node (its children use its items, it re-exports theirs).

Exit status 1, with every circle printed as a path and one example reference per hop, or with
the files over the limit / the unsafe found. Usage: python3 scripts/check-imports.py [--graph]
(print the graph) | --self-test (run the checks on made-up trees that must fail or pass).
"""

import os
import re
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")

# Longest a file in src/ may be (lines).
MAX_LINES = 1200

# Where `unsafe` may appear: a file, or a folder ending in '/'. Mirrors ARCHITECTURE.md: SIMD
# unmasking, the io_uring module(s) and the fd/syscall wrapper.
UNSAFE_ALLOWED = ("src/protocol/mask.rs", "src/edge/uring/", "src/edge/fd.rs")

# Findings other helpers of issue 12 remove on their branches; the merger empties this set.
# Each entry: (check, path). Listed findings are reported as "known" and do not fail.
KNOWN: set = set()

TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|::|[{}(),;*]|\S")


def strip(text):
    """Blank out comments, string/char literals (keeping newlines so line numbers hold)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a): only blank the former.
            m = re.match(r"'(\\(u\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{2}|.)|[^\\'])'", text[i:])
            if m:
                out.append(" " * len(m.group(0)))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_path(rel):
    """src/edge/worker.rs -> ['edge', 'worker']; src/edge/mod.rs -> ['edge']; lib/main -> []."""
    parts = rel[len("src/"):-len(".rs")].split("/")
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]):
        return []
    return parts


def tokens(text):
    """(token, line) pairs."""
    line = 1
    pos = 0
    for m in TOKEN.finditer(text):
        line += text.count("\n", pos, m.start())
        pos = m.start()
        yield m.group(0), line


def paths_in(text, base, is_main):
    """Every module path the file names, as (absolute path segments, line).

    `base` is the file's module path. Tracks inline `mod x {` blocks so `super::` inside
    `mod tests` climbs to the file's module, not above it."""
    toks = list(tokens(text))
    found = []
    inline = []  # stack of (name, brace depth at which it opened)
    depth = 0
    i = 0

    def here():
        return base + [name for name, _ in inline]

    def read_path(j, prefix):
        """Read `seg::seg::...` or a `{...}` group starting at toks[j]; yield full paths."""
        segs = list(prefix)
        while j < len(toks):
            t = toks[j][0]
            if t == "{":
                # A use-group: split at depth-1 commas, recurse on each item.
                k, d, item_start = j + 1, 1, j + 1
                items = []
                while k < len(toks) and d:
                    if toks[k][0] == "{":
                        d += 1
                    elif toks[k][0] == "}":
                        d -= 1
                        if d == 0:
                            items.append((item_start, k))
                    elif toks[k][0] == "," and d == 1:
                        items.append((item_start, k))
                        item_start = k + 1
                    k += 1
                out = []
                for a, b in items:
                    if a < b:
                        sub = read_group_item(a, b, segs)
                        out.extend(sub)
                return out or [segs]
            if re.match(r"[A-Za-z_]", t):
                if t == "self" and segs:
                    j += 1
                else:
                    segs.append(t)
                    j += 1
                if j < len(toks) and toks[j][0] == "::":
                    j += 1
                    continue
                return [segs]
            if t == "*":
                return [segs]
            return [segs]
        return [segs]

    def read_group_item(a, b, prefix):
        segs = list(prefix)
        j = a
        while j < b:
            t = toks[j][0]
            if t == "super":
                segs = segs[:-1]
            elif t == "{":
                return read_path(j, segs)
            elif re.match(r"[A-Za-z_]", t) and t not in ("self", "as"):
                segs.append(t)
            elif t == "as":
                break
            j += 1
        return [segs]

    while i < len(toks):
        t, line = toks[i]
        if t == "mod" and i + 2 < len(toks) and toks[i + 2][0] == "{":
            inline.append((toks[i + 1][0], depth + 1))
        if t == "{":
            depth += 1
        elif t == "}":
            if inline and inline[-1][1] == depth:
                inline.pop()
            depth -= 1
        prev = toks[i - 1][0] if i else ""
        starts = prev != "::"
        if starts and t == "crate" and i + 1 < len(toks) and toks[i + 1][0] == "::":
            for p in read_path(i + 2, []):
                found.append((p, line))
        elif starts and is_main and t == "ringway" and i + 1 < len(toks) and toks[i + 1][0] == "::":
            for p in read_path(i + 2, []):
                found.append((p, line))
        elif starts and t == "super" and i + 1 < len(toks) and toks[i + 1][0] == "::":
            up = here()
            j = i
            while j + 1 < len(toks) and toks[j][0] == "super" and toks[j + 1][0] == "::":
                up = up[:-1]
                j += 2
            for p in read_path(j, up):
                found.append((p, line))
        i += 1
    return found


def top_modules():
    names = set()
    for entry in os.listdir(SRC):
        full = os.path.join(SRC, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            names.add(entry[:-3])
        elif os.path.isdir(full) and entry != "bin":
            names.add(entry)
    return names


def find_cycles(graph):
    """Strongly connected components with more than one node (Tarjan), each as a cycle path."""
    index, low, on, stack, comps = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:
        # One concrete circle through the component: breadth-first from its first node back
        # to itself, staying inside the component.
        members = set(comp)
        start = comp[0]
        prev = {start: None}
        queue = [start]
        back = None
        while queue and back is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    back = v
                    break
                if w in members and w not in prev:
                    prev[w] = v
                    queue.append(w)
        path = [start]
        v = back
        while v is not None and v != start:
            path.insert(1, v)
            v = prev[v]
        cycles.append((comp, path + [start]))
    return cycles


def self_test():
    """The checks on a made-up tree: each must catch what it is for, and a clean tree passes."""
    import contextlib
    import io
    import tempfile

    global ROOT, SRC, KNOWN
    saved = (ROOT, SRC, KNOWN)
    cases = {
        # a -> b through a use-group, b's child climbs back to a with super::super.
        "circle through a group and super::": (
            {
                "src/a.rs": "use crate::{ids, b::c::Thing};\n",
                "src/b/mod.rs": "pub mod c;\n",
                "src/b/c.rs": "pub struct Thing;\nfn f() { super::super::a::g(); }\n",
                "src/ids.rs": "",
            },
            "import circle between top-level modules: a -> b -> a",
        ),
        "circle between the files of one folder": (
            {
                "src/e/mod.rs": "mod x;\nmod y;\n",
                "src/e/x.rs": "use super::y::Y;\n",
                "src/e/y.rs": "fn f() { crate::e::x::g() }\n",
            },
            "import circle between files of one folder: e::x -> e::y -> e::x",
        ),
        "unsafe outside the allow-list": (
            {"src/a.rs": "// unsafe in a comment is fine\nfn f() { unsafe { g() } }\n"},
            "src/a.rs: `unsafe` outside the allow-list at line(s) 2",
        ),
        "a file over the limit": (
            {"src/a.rs": "\n" * (MAX_LINES + 1)},
            f"src/a.rs: {MAX_LINES + 1} lines",
        ),
        "comments, strings and tests do not count": (
            {
                "src/a.rs": 'const S: &str = "crate::b::x";\n/* crate::b::y */\n'
                "mod tests { use super::*; }\n",
                "src/b.rs": "use crate::a::S;\n",
            },
            None,
        ),
    }
    failed = 0
    try:
        for name, (tree, want) in cases.items():
            with tempfile.TemporaryDirectory() as tmp:
                for rel, text in tree.items():
                    os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
                    with open(os.path.join(tmp, rel), "w", encoding="utf-8") as fh:
                        fh.write(text)
                ROOT, SRC, KNOWN = tmp, os.path.join(tmp, "src"), set()
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    rc = main([])
                text = out.getvalue()
                ok = (rc == 0) if want is None else (rc == 1 and want in text)
                print(f"self-test {'ok  ' if ok else 'FAIL'} {name}")
                if not ok:
                    failed += 1
                    print(text)
    finally:
        ROOT, SRC, KNOWN = saved
    return 1 if failed else 0


def main(argv):
    show_graph = "--graph" in argv
    tops = top_modules()
    files = []
    for dirpath, dirnames, filenames in os.walk(SRC):
        dirnames[:] = sorted(d for d in dirnames if not (dirpath == SRC and d == "bin"))
        for f in sorted(filenames):
            if f.endswith(".rs"):
                files.append(os.path.relpath(os.path.join(dirpath, f), ROOT))

    top_graph = defaultdict(set)
    sub_graph = defaultdict(set)
    example = {}
    failures = []
    known = []

    def finding(kind, path, message):
        (known if (kind, path) in KNOWN else failures).append(message)

    for rel in files:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as fh:
            raw = fh.read()
        lines = raw.count("\n") + (0 if raw.endswith("\n") or not raw else 1)
        if lines > MAX_LINES:
            finding("size", rel, f"{rel}: {lines} lines (limit {MAX_LINES})")
        text = strip(raw)
        if not any(rel == a or (a.endswith("/") and rel.startswith(a)) for a in UNSAFE_ALLOWED):
            hits = [str(n) for n, l in enumerate(text.split("\n"), 1) if re.search(r"\bunsafe\b", l)]
            if hits:
                finding("unsafe", rel, f"{rel}: `unsafe` outside the allow-list at line(s) {', '.join(hits)}")
        base = module_path(rel)
        is_main = rel == "src/main.rs"
        src_top = "main" if is_main else (base[0] if base else None)
        if src_top is None:
            continue  # lib.rs only declares the modules
        for path, line in paths_in(text, base, is_main):
            if not path or path[0] not in tops:
                continue
            dst_top = path[0]
            if dst_top != src_top:
                top_graph[src_top].add(dst_top)
                example.setdefault((src_top, dst_top), f"{rel}:{line}")
            elif len(base) >= 2 and len(path) >= 2 and base[:1] == path[:1]:
                # Within one folder: file (or sub-folder) to file, mod.rs excluded.
                a, b = "::".join(base[:2]), "::".join(path[:2])
                sub_folder = os.path.join(SRC, *path[:1])
                is_child = os.path.exists(os.path.join(sub_folder, path[1] + ".rs")) or os.path.isdir(
                    os.path.join(sub_folder, path[1])
                )
                if a != b and is_child:
                    sub_graph[a].add(b)
                    example.setdefault((a, b), f"{rel}:{line}")
        top_graph.setdefault(src_top, set())

    if show_graph:
        for v in sorted(top_graph):
            print(f"{v} -> {', '.join(sorted(top_graph[v])) or '(nothing)'}")
        for v in sorted(sub_graph):
            print(f"  {v} -> {', '.join(sorted(sub_graph[v]))}")

    for level, graph in (("top-level modules", top_graph), ("files of one folder", sub_graph)):
        for comp, path in find_cycles(graph):
            hops = "\n".join(
                f"    {a} -> {b}   ({example[(a, b)]})" for a, b in zip(path, path[1:])
            )
            failures.append(
                f"import circle between {level}: {' -> '.join(path)}\n"
                f"  (all of {{{', '.join(comp)}}} reach each other)\n{hops}"
            )

    for k in known:
        print(f"known (fixed on another branch of issue 12): {k}")
    if failures:
        for f in failures:
            print(f"FAIL {f}")
        return 1
    edges = sum(len(v) for v in top_graph.values())
    print(
        f"check-imports: ok ({len(files)} files, {len(top_graph)} top-level modules, {edges} "
        f"edges, no circle; no file over {MAX_LINES} lines; unsafe only in {', '.join(UNSAFE_ALLOWED)}"
        + (f"; {len(known)} known finding(s) listed in KNOWN)" if known else ")")
    )
    return 0


if __name__ == "__main__":
    sys.exit(self_test() if "--self-test" in sys.argv else main(sys.argv[1:]))
