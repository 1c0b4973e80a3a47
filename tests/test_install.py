"""tests/test_install.py — what a newcomer and a packager rely on: the example configs pass
the check, the man page (the one reference) names every key and every metric and proxy.ini
every key, the README stays short and the docs link only to code and files that exist,
`make install` lays out binary, man page, unit and config under DESTDIR, the man page renders,
and systemd accepts the unit."""
import glob
import os
import re
import shutil
import subprocess

from lib import PROXY, TMP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_configs_pass_the_check():
    examples = sorted(glob.glob(os.path.join(ROOT, "examples", "*.ini")))
    assert len(examples) >= 3, examples
    for path in examples + [os.path.join(ROOT, "proxy.ini")]:
        # -t opens the log as start-up would; /var/log/proxy is made by the systemd unit
        # (LogsDirectory=), not here, so a copy logs into the test's directory instead.
        with open(path) as f:
            text = f.read().replace("/var/log/proxy/", TMP + "/")
        copy = os.path.join(TMP, os.path.basename(path))
        with open(copy, "w") as f:
            f.write(text)
        r = subprocess.run([PROXY, "-t", "-c", copy], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0 and "configuration ok" in r.stdout, (path, r.stderr)


def test_the_reference_names_every_key_and_every_metric():
    """The man page is the complete reference: each key of config.c's table has an entry
    there and a line in proxy.ini, and each metric the code exports is named there. The README
    and TOUR.md link to it instead of repeating it."""
    def read(name):
        with open(os.path.join(ROOT, name)) as f:
            return f.read()
    page, ini = read("proxy.1"), read("proxy.ini")
    keys = re.findall(r'\{"(\w+)", "(\w+)", [A-Z]+,', read("config.c"))
    assert len(keys) > 20, keys
    for section, key in keys:
        if key == "*":
            continue
        assert re.search(r"^\.B %s$" % key, page, re.M), "proxy.1 has no entry for %s" % key
        assert re.search(r"^;?%s\s*=" % key, ini, re.M), "proxy.ini has no line for %s" % key
    code = read("stats.c") + read("http.c")
    metrics = set(re.findall(r'"(proxy_[a-z_]+[a-z])', code))
    assert len(metrics) > 20, metrics
    for m in sorted(metrics):
        assert m in page, "proxy.1 does not name the metric %s" % m


DOCS = ("README.md", "TOUR.md", "bench/README.md")


def test_the_docs_link_only_to_code_that_exists():
    """Every [`name`](file.c) link in README.md, TOUR.md and bench/README.md names something
    the file defines or uses outside its comments, so that a rename fails here instead of a
    reader (the README linked to http.c's send_request long after it was gone)."""
    def code_of(path):
        with open(path) as f:
            text = f.read()
        return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)
    links = 0
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        for name, target in re.findall(r"\[`([A-Za-z_]\w*)(?:\(\))?`\]\(([\w./-]+\.[ch])\)", text):
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))
            assert os.path.exists(path), "%s links to %s, which does not exist" % (doc, target)
            assert re.search(r"\b%s\b" % name, code_of(path)), \
                "%s links to %s in %s, which has no such name" % (doc, name, target)
            links += 1
    assert links > 100, links
    print("     %d links to code, every one to a name its file defines or uses" % links)


def slug(heading):
    """The anchor a Markdown renderer gives a heading: lower case, punctuation dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_in_the_docs_stays_in_the_repo_and_exists():
    """The docs stand alone: every Markdown link in README.md, TOUR.md and bench/README.md is
    to a file of this repository that exists (and, with #anchor, to one of its headings),
    never to a web address."""
    checked = 0
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            assert not re.match(r"[a-z]+:", target), "%s links outside the repo: %s" % (doc, target)
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path \
                else os.path.join(ROOT, doc)
            assert full.startswith(ROOT) and os.path.exists(full), \
                "%s links to %s, which does not exist" % (doc, target)
            if anchor:
                with open(full) as f:
                    heads = [slug(h) for h in re.findall(r"^#+ (.*)$", f.read(), re.M)]
                assert anchor in heads, "%s links to %s: no such heading" % (doc, target)
            checked += 1
    assert checked > 100, checked


def test_the_readme_is_short_and_starts_with_the_two_commands():
    """The README is the way in, not the reference: at most 250 lines, and the first commands
    in it are make run and make test."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 250, "README.md has %d lines" % len(text.splitlines())
    first = re.search(r"```sh\n(.*?)```", text, re.S).group(1).splitlines()
    assert [line.split()[:2] for line in first[:2]] == [["make", "run"], ["make", "test"]], first


def test_make_install_into_destdir():
    dest = os.path.join(TMP, "destdir")
    shutil.rmtree(dest, ignore_errors=True)
    binary = os.path.relpath(PROXY, ROOT)
    build = os.path.dirname(binary) or "build"  # build/asan for build/asan/proxy
    r = subprocess.run(["make", "-s", "-o", binary, "install", "BIN=" + binary, "B=" + build,
                        "DESTDIR=" + dest, "PREFIX=/usr"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    usr = os.path.join(dest, "usr")
    installed = os.path.join(usr, "bin", "proxy")
    assert subprocess.run([installed, "-V"], capture_output=True, text=True).stdout.startswith(
        "proxy ")
    config = os.path.join(dest, "etc/proxy/proxy.ini")
    r = subprocess.run([installed, "-t", "-c", config], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mode = os.stat(config).st_mode & 0o777
    assert mode == 0o600, "the config holds passwords, but is installed %o" % mode
    unit = os.path.join(usr, "lib/systemd/system/proxy.service")
    with open(unit) as f:
        text = f.read()
    assert "ExecStart=/usr/bin/proxy -c /run/proxy/proxy.ini" in text
    for hardening in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict",
                      "LimitNOFILE=", "RuntimeDirectoryMode=0700"):
        assert hardening in text, hardening
    # A start and a reload each check the file the operator edits, then copy it for the
    # service; a reload signals only after both succeeded.
    for step in ("ExecStartPre", "ExecReload"):
        lines = re.findall(r"^%s=(.*)$" % step, text, re.M)
        assert lines[0] == "+/usr/bin/proxy -t -c /etc/proxy/proxy.ini", lines
        assert lines[1].startswith("+/bin/sh -c '") and lines[1].endswith("'"), lines
    assert re.findall(r"^ExecReload=(.*)$", text, re.M)[2] == "/bin/kill -HUP $MAINPID"
    # The copy, run here with our paths: the service's user (the directory's owner) alone
    # reads it, and a reader never sees it half-written.
    script = re.search(r"^ExecReload=\+/bin/sh -c '(.*)'$", text, re.M).group(1)
    run_dir = os.path.join(dest, "run-proxy")
    os.makedirs(run_dir, exist_ok=True)
    script = script.replace("/etc/proxy/proxy.ini", config).replace("/run/proxy", run_dir)
    subprocess.run(["sh", "-c", script], check=True, timeout=10)
    copy = os.path.join(run_dir, "proxy.ini")
    assert os.stat(copy).st_mode & 0o777 == 0o600 and open(copy).read() == open(config).read()
    assert os.stat(copy).st_uid == os.stat(run_dir).st_uid
    socket_unit = os.path.join(usr, "lib/systemd/system/proxy.socket")
    with open(socket_unit) as f:
        assert "ListenStream=127.0.0.1:8888" in f.read()  # the shipped config's listen
    assert len(glob.glob(os.path.join(usr, "share/doc/proxy/examples/*.ini"))) >= 3
    page = os.path.join(usr, "share/man/man1/proxy.1")
    if shutil.which("man"):
        r = subprocess.run(["man", "--warnings", "-l", page], capture_output=True, text=True,
                           env=dict(os.environ, MANWIDTH="80", MANPAGER="cat"), timeout=20)
        assert r.returncode == 0 and "reuse_port" in r.stdout and not r.stderr, r.stderr
    if shutil.which("systemd-analyze"):  # it checks that ExecStart exists: point it at ours
        check = os.path.join(TMP, "proxy.service")
        with open(check, "w") as f:
            f.write(text.replace("/usr/bin/proxy", installed))
        r = subprocess.run(["systemd-analyze", "verify", check], capture_output=True, text=True,
                           timeout=30, env=dict(os.environ, MANPATH=os.path.join(usr, "share/man")))
        assert r.returncode == 0, r.stdout + r.stderr
