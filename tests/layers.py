#!/usr/bin/env python3
"""tests/layers.py: checks that the source files are layers, from the object files.

    python3 tests/layers.py build/net.o build/config.o ... build/proxy.o

The object files are given bottom-up, in the order proxy.h lists their sections. A file uses
another when it refers to a symbol the other defines (`nm`). The check fails (exit 1) when
files call each other in a circle, or when a file calls one that comes after it in the
order. Either way the reader of a lower file would meet a higher one. It prints what each
file uses, by file, so the graph can be read here too.
"""
import os
import subprocess
import sys


def symbols(obj):
    """(defined, undefined) global symbol names of one object file."""
    out = subprocess.run(["nm", "-P", obj], capture_output=True, text=True, check=True).stdout
    defined, undefined = set(), set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        name, kind = parts[0], parts[1]
        if kind == "U":
            undefined.add(name)
        elif kind.isupper():
            defined.add(name)
    return defined, undefined


def graph(objs):
    """{file: {file it uses: sorted symbols}} over the given objects."""
    names = [os.path.basename(o)[:-2] + ".c" for o in objs]
    syms = {n: symbols(o) for n, o in zip(names, objs)}
    owner = {s: n for n, (defined, _) in syms.items() for s in defined}
    uses = {n: {} for n in names}
    for n, (_, undefined) in syms.items():
        for s in undefined:
            if s in owner and owner[s] != n:
                uses[n].setdefault(owner[s], []).append(s)
    return names, {n: {m: sorted(v) for m, v in d.items()} for n, d in uses.items()}


def circles(names, uses):
    """The strongly connected groups of more than one file (Tarjan's algorithm)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in uses[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in names:
        if v not in index:
            visit(v)
    return found


def main():
    objs = sys.argv[1:]
    if not objs:
        sys.exit("usage: layers.py OBJECT... (bottom-up)")
    names, uses = graph(objs)
    order = {n: i for i, n in enumerate(names)}
    problems = []
    for group in circles(names, uses):
        problems.append("a circle: " + ", ".join(group) + " call each other")
    for n in names:
        for m, syms in uses[n].items():
            if order[m] > order[n]:
                problems.append(f"{n} calls {m}, a layer above it: {', '.join(syms)}")
    for n in reversed(names):
        below = ", ".join(m for m in sorted(uses[n], key=order.get, reverse=True))
        print(f"{n:14} uses {below or 'nothing of ours'}")
    for p in problems:
        print("FAIL " + p)
    print("layers: %s" % ("%d problems" % len(problems) if problems else "no circles, every call goes down"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
