"""tests/test_http_access.py — where http mode lets a request go: the [access] forward_ports
allow-list for absolute-form requests.

Helpers come from test_http.py; every test name starts with test_http_ (run.py -k test_http_)."""
import re

from lib import Proxy, Server, closed_port, echo_handler
from test_http import (AUTH, ESTABLISHED, PASSWORD, USER, Client, assert_error, get, origin,
                       request, url)


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
