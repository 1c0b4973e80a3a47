"""tests/test_http_access.py — where http mode lets a request go and how it treats credentials:
the [access] forward_ports allow-list for absolute-form requests, port lists that are strict in
the config, and the bound on failed 407s per client connection.

Helpers come from test_http.py; every test name starts with test_http_ (run.py -k test_http_)."""
import os
import re
import subprocess

from lib import PROXY, TMP, Proxy, Server, closed_port, echo_handler
from test_http import (AUTH, ESTABLISHED, PASSWORD, USER, WRONG, Client, assert_error, basic, get,
                       origin, request, url)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_limit(name):
    """A build-time limit from proxy.h, so that the tests follow it when it changes."""
    with open(os.path.join(ROOT, "proxy.h")) as f:
        return int(re.search(r"^#define %s\s+(\d+)" % name, f.read(), re.M).group(1))


def access_proxy(upstream=None, users=True, access=None, **keys):
    """An http-mode Proxy with the given [access] keys; with users, alice must authenticate."""
    sections = {"access": access} if access else {}
    if users:
        sections["users"] = {USER: PASSWORD}
    keys.setdefault("header_timeout", 5)
    return Proxy(upstream, mode="http", sections=sections, **keys)


def get_url(target):
    """GET target (absolute-form), without credentials."""
    return request("GET", target, "Host: h")


# ---- forward_ports: where absolute-form requests may go ---------------------------------

def test_http_forward_to_a_port_outside_forward_ports_gets_403_and_reaches_nothing():
    with origin() as o, access_proxy(access={"forward_ports": "80"}) as px:
        c = Client(px)
        assert_error(c.ask(get(o, "/", AUTH)), 403, "Forbidden")
        assert c.closed(), "a 403 ends the connection like the other refusals"
        c = Client(px)  # a body must not slip through either
        assert_error(c.ask(request("POST", url(o, "/p"), "Host: h", AUTH, "Content-Length: 5",
                                   body=b"hello")), 403, "Forbidden")
        assert c.closed()
        assert o.conns == 0, "a request to a port outside forward_ports reached it"
        for method in ("GET", "POST"):
            px.wait_line(r" %s %s %s 403 " % (USER, method, re.escape(o.addr)))
        assert px.metric('proxy_http_responses_total{code="4xx"}') == 2


def test_http_forward_ports_default_refuses_smtp_and_ssh_but_not_high_ports():
    dead = closed_port()
    with access_proxy(users=False, connect_timeout=2) as px:
        for port in (25, 22, 1024):  # nothing need listen there: the answer comes first
            c = Client(px)
            assert_error(c.ask(request("POST", "http://127.0.0.1:%d/" % port, "Host: h",
                                       "Content-Length: 4", body=b"HELO")), 403, "Forbidden")
            assert c.closed()
        # A port in 1025-65535 is allowed: nothing listens there, so the connect fails.
        c = Client(px)
        assert_error(c.ask(get_url("http://127.0.0.1:%d/" % dead)), 502, "Bad Gateway")


def test_http_forward_ports_inside_the_list_are_forwarded_and_other_forms_unaffected():
    with origin(name=b"A") as a, origin(name=b"U") as up, Server(echo_handler) as echo:
        ports = "80, %d-%d" % (a.port, a.port)
        with access_proxy(up.addr, access={"forward_ports": ports,
                                               "connect_ports": str(echo.port)}) as px:
            c = Client(px)
            resp = c.ask(get(a, "/in", AUTH))
            assert resp.status == 200 and resp.body == b"A /in", resp.head
            # Origin-form goes to the configured upstream, whatever forward_ports says.
            resp = c.ask(request("GET", "/origin", "Host: h", AUTH))
            assert resp.status == 200 and resp.body == b"U /origin", resp.head
            assert up.port != a.port  # else the line above proves nothing
            # CONNECT is checked against connect_ports alone.
            t = Client(px)
            t.send(request("CONNECT", echo.addr, "Host: h", AUTH) + b"ping")
            assert t.r.exactly(len(ESTABLISHED) + 4) == ESTABLISHED + b"ping"
        with access_proxy(users=False, access={"forward_ports": "*"}) as px:
            resp = Client(px).ask(get_url(url(a, "/star")))
            assert resp.status == 200 and resp.body == b"A /star", resp.head


# ---- port lists: strict syntax ----------------------------------------------------------

BAD_PORTS = ["*-5", "*-junk", "5-*", "*5", "5-", "-5", "5-3", "0", "65536", "0-80", "80-65536",
             "1-2-3", "5 - 10", "+5", "0x50", "80 443", "99999999999999999999"]
GOOD_PORTS = ["*", " * ", "*, 80", "65535", "1-1", "443, 8000-8002,"]


def check_config(text, serve=True):
    """Runs ./proxy -t (and ./proxy if serve) on text: [(exit status, stderr)]. Free ports and
    no metrics listener, so that a file wrongly accepted serves nowhere that matters, and is
    stopped."""
    path = os.path.join(TMP, "ports.ini")
    with open(path, "w") as f:
        f.write("[proxy]\nmode = http\nlisten = 127.0.0.1:0\n[stats]\nlisten =\n" + text)
    results = []
    for args in (["-t", "-c", path], ["-c", path])[:1 + serve]:
        try:
            r = subprocess.run([PROXY, *args], capture_output=True, text=True, timeout=5)
            results.append((r.returncode, r.stderr))
        except subprocess.TimeoutExpired:
            results.append((None, "started serving"))
    return path, results


def test_http_malformed_port_lists_exit_2_naming_file_and_line():
    failures = []
    for key in ("connect_ports", "forward_ports"):
        for value in BAD_PORTS:
            path, results = check_config("[access]\n%s = %s\n" % (key, value))
            want = re.escape("%s:7: %s: '%s' is not a port" % (path, key, value))
            for status, err in results:
                if status != 2 or not re.match(want, err):
                    failures.append("%s = %r: exit %s, %r" % (key, value, status, err))
        for value in GOOD_PORTS:
            _, ((status, err),) = check_config("[access]\n%s = %s\n" % (key, value), serve=False)
            if status != 0:
                failures.append("%s = %r refused: %r" % (key, value, err))
    assert not failures, "\n".join(failures)


# ---- credentials: a bounded number of failures per connection ---------------------------

def test_http_auth_failures_on_one_connection_are_bounded_then_it_closes():
    limit = build_limit("AUTH_FAILURES_MAX")
    assert limit >= 2, "the test needs a 407 that keeps the connection"
    # Each reason counts: no credentials, a wrong password, a header that is not Basic.
    kinds = [("missing", ()), ("bad_credentials", (basic(password=WRONG),)),
             ("malformed", ("Proxy-Authorization: Basic !!" + PASSWORD,))]
    sent = {reason: 0 for reason, _ in kinds}
    with origin() as o, access_proxy() as px:
        c = Client(px)
        for i in range(limit):
            reason, fields = kinds[i % len(kinds)]
            sent[reason] += 1
            resp = c.ask(get(o, "/fail%d" % i, *fields))
            assert resp.status == 407, resp.head
            if i < limit - 1:
                assert resp.get("connection") == [], "407 #%d closed: %r" % (i + 1, resp.head)
                # A success in between does not wipe the slate.
                assert c.ask(get(o, "/ok%d" % i, AUTH)).status == 200
            else:
                assert_error(resp, 407, "Proxy Authentication Required")
                assert c.closed(), "the connection stayed open after %d failures" % limit
        assert not [h for h in o.heads if h.target.startswith("/fail")], "a failure got through"
        # The limit is per connection, not a ban: the next connection starts afresh.
        c = Client(px)
        resp = c.ask(get(o, "/again", basic(password=WRONG)))
        assert resp.status == 407 and resp.get("connection") == [], resp.head
        assert c.ask(get(o, "/after", AUTH)).status == 200
        sent["bad_credentials"] += 1
        for reason, n in sent.items():
            got = px.metric('proxy_auth_failures_total{reason="%s"}' % reason)
            assert got == n, "%s: %s, want %d" % (reason, got, n)
