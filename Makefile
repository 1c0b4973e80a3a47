# Makefile — build, run, test (plain and under sanitizers), clean. `make help` lists targets.
# Missing Debian packages are installed with apt-get when run as root, else named.

SHELL    = /bin/bash
CC      ?= cc
CFLAGS  ?= -O2 -g
WARN     = -Wall -Wextra -Wpedantic -Werror -Wno-missing-field-initializers
ALL_CFLAGS = $(CPPFLAGS) $(CFLAGS) $(WARN) -std=c11 -D_GNU_SOURCE -pthread $(SAN)
LDLIBS   = $(shell pkg-config --libs inih 2>/dev/null || echo -linih) -pthread

B       ?= build
PREFIX  ?= /usr/local
DESTDIR ?=
UNITDIR ?= $(PREFIX)/lib/systemd/system
BIN     ?= proxy
# Bottom-up, as proxy.h lists them: each file calls only those before it (`make layers`).
SRC      = net.c config.c running.c stats.c limits.c proxy_protocol.c admin.c end.c room.c copy.c upstream.c \
           pool.c http_parse.c auth.c http_io.c http_head.c http_exchange.c tcp.c http.c acceptor.c plan.c
OBJ      = $(SRC:%.c=$(B)/%.o)

# $(call need,PACKAGES): install with apt-get as root, or say what to install and stop.
need = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: installing $(1) with apt-get"; \
	  apt-get install -y -q $(1) >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q $(1) >/dev/null; }; \
	else echo "make: missing packages; run: sudo apt-get install $(1)" >&2; exit 1; fi

FUZZ     = head chunked auth config proxy
FUZZ_SECONDS ?= 30
NUMERIC_DNS  = -Wl,--wrap=getaddrinfo # fuzz_config: no input may reach the DNS

# A sample of the integration tests under valgrind (each is slow there): every mode and
# the error paths, none that asserts on timing.
VALGRIND_TESTS = half_close,failover_to,proxy_protocol,curl_through,test_http_curl_gets
VALGRIND_TESTS := $(VALGRIND_TESTS),test_http_post_bodies,test_http_pipelined,upgrade_101
VALGRIND_TESTS := $(VALGRIND_TESTS),resets_mid,second_host,balancers_proxy_header,deny_destinations_by
VALGRIND = valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite

.PHONY: all run test layers asan tsan fuzz fuzz-run valgrind lint soak bench bench-quick install deb \
  uninstall deps test-deps clean help
all: $(BIN)

help:
	@echo "make            build ./proxy"
	@echo "make run        build and run ./proxy -c proxy.ini"
	@echo "make test       unit and integration tests; ends with 'N passed, N failed'"
	@echo "make layers     fails if source files call each other in a circle or call upwards"
	@echo "make asan       the same tests against an AddressSanitizer+UBSan build"
	@echo "make tsan       the same tests against a ThreadSanitizer build"
	@echo "make fuzz       each libFuzzer target for FUZZ_SECONDS (default 30) under ASan+UBSan"
	@echo "make valgrind   unit tests and a sample of integration tests under valgrind"
	@echo "make lint       cppcheck and clang-tidy (.clang-tidy); no finding may remain"
	@echo "make soak       SOAK_SECONDS (default 600) of mixed load; RSS, fds, threads must stay flat"
	@echo "make bench      side-by-side benchmarks with peers (< 20 min); see bench/README.md"
	@echo "make bench-quick  the same, one short round (< 4 min)"
	@echo "make install    PREFIX=/usr/local DESTDIR=: binary, man page, systemd unit, examples,"
	@echo "                /etc/proxy/proxy.ini (kept if present); make uninstall undoes it"
	@echo "make deb        a Debian package in build/deb (dpkg-buildpackage; lintian checks it)"
	@echo "make clean"

deps:
	@pkg-config --exists inih 2>/dev/null || { $(call need,libinih-dev pkg-config); }

# wrk loads the proxy while it reloads; systemd-socket-activate hands it a socket as systemd would.
test-deps:
	@command -v python3 >/dev/null && command -v curl >/dev/null && command -v openssl >/dev/null \
	  && command -v wrk >/dev/null && command -v systemd-socket-activate >/dev/null \
	  || { $(call need,python3 curl openssl wrk systemd); }

$(B):
	mkdir -p $(B)

$(B)/%.o: %.c proxy.h | deps $(B)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(BIN): $(OBJ) $(B)/proxy.o
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(B)/unit: tests/unit.c $(OBJ)
	$(CC) $(ALL_CFLAGS) -I. -o $@ $^ $(LDLIBS)

run: $(BIN)
	./$(BIN) -c proxy.ini

test: $(BIN) $(B)/unit | test-deps
	python3 tests/run.py --proxy ./$(BIN) --unit $(B)/unit

layers: $(OBJ) $(B)/proxy.o
	python3 tests/layers.py $(OBJ) $(B)/proxy.o

# Sanitizer builds live in their own directories so they never mix with ./proxy's objects.
asan:
	$(MAKE) --no-print-directory B=build/asan BIN=build/asan/proxy CFLAGS="-O1 -g" \
	  SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" test

tsan:
	$(MAKE) --no-print-directory B=build/tsan BIN=build/tsan/proxy CFLAGS="-O1 -g" \
	  SAN="-fsanitize=thread" test

valgrind: $(BIN) $(B)/unit | test-deps
	@command -v valgrind >/dev/null || { $(call need,valgrind); }
	$(VALGRIND) $(B)/unit >/dev/null
	PROXY_WRAPPER="$(VALGRIND)" python3 tests/run.py --proxy ./$(BIN) --unit $(B)/unit \
	  -k $(VALGRIND_TESTS)

bench:
	python3 bench/run.py

bench-quick:
	python3 bench/run.py --quick

soak: $(BIN) | test-deps
	PROXY_BIN=./$(BIN) python3 tests/soak.py

lint:
	@command -v cppcheck >/dev/null && command -v clang-tidy >/dev/null || \
	  { $(call need,cppcheck clang-tidy); }
	cppcheck --enable=warning,performance,portability,style --std=c11 --inline-suppr --quiet \
	  --error-exitcode=1 -D_GNU_SOURCE -I. $(SRC) proxy.c
	clang-tidy --quiet $(SRC) proxy.c -- -std=c11 -D_GNU_SOURCE -I. 2>/dev/null

# libFuzzer targets (clang): the objects get coverage instrumentation, each target its main.
fuzz:
	@command -v clang >/dev/null || { $(call need,clang libclang-rt-dev); }
	$(MAKE) --no-print-directory B=build/fuzz CC=clang CFLAGS="-O1 -g" \
	  SAN="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all" fuzz-run

fuzz-run: $(FUZZ:%=$(B)/fuzz_%)
	@for t in $(FUZZ); do mkdir -p $(B)/corpus/$$t; echo "== fuzz_$$t for $(FUZZ_SECONDS) s"; \
	  $(B)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=20000 -print_final_stats=1 \
	    $(B)/corpus/$$t tests/corpus/$$t 2>&1 | grep -E "stat::number_of_executed_units|ERROR|SUMMARY|Done"; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; done

$(B)/fuzz_%: tests/fuzz/fuzz_%.c $(OBJ)
	$(CC) $(ALL_CFLAGS) -fsanitize=fuzzer -o $@ $^ $(LDLIBS) \
	  $(if $(findstring config,$*),$(NUMERIC_DNS))

install: $(BIN)
	install -Dm755 $(BIN) $(DESTDIR)$(PREFIX)/bin/proxy
	install -Dm644 proxy.1 $(DESTDIR)$(PREFIX)/share/man/man1/proxy.1
	sed 's|/usr/local|$(PREFIX)|g' proxy.service > $(B)/proxy.service
	install -Dm644 $(B)/proxy.service $(DESTDIR)$(UNITDIR)/proxy.service
	install -Dm644 proxy.socket $(DESTDIR)$(UNITDIR)/proxy.socket
	install -d $(DESTDIR)$(PREFIX)/share/doc/proxy/examples
	install -m644 README.md TOUR.md $(DESTDIR)$(PREFIX)/share/doc/proxy/
	install -m644 examples/*.ini $(DESTDIR)$(PREFIX)/share/doc/proxy/examples/
	test -e $(DESTDIR)/etc/proxy/proxy.ini || install -Dm600 proxy.ini $(DESTDIR)/etc/proxy/proxy.ini

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/proxy $(DESTDIR)$(PREFIX)/share/man/man1/proxy.1 \
	  $(DESTDIR)$(UNITDIR)/proxy.service $(DESTDIR)$(UNITDIR)/proxy.socket
	rm -rf $(DESTDIR)$(PREFIX)/share/doc/proxy

# The package is built from a copy of the source in build/deb, so that the tree stays clean and
# the .deb lands in build/deb rather than in the parent directory.
deb:
	@command -v dpkg-buildpackage >/dev/null && command -v dh >/dev/null \
	  && command -v lintian >/dev/null || { $(call need,dpkg-dev debhelper lintian); }
	rm -rf build/deb && mkdir -p build/deb/proxy
	tar --exclude=./build --exclude=./.git --exclude=./proxy -cf - . | tar -xf - -C build/deb/proxy
	cd build/deb/proxy && dpkg-buildpackage -b -us -uc
	lintian --fail-on error build/deb/proxy_*.changes

clean:
	rm -rf build proxy
