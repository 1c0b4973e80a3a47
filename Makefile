# Makefile — build, run, test (plain and under sanitizers), clean. `make help` lists targets.
# Missing Debian packages are installed with apt-get when run as root, else named.

CC      ?= cc
CFLAGS  ?= -O2 -g
WARN     = -Wall -Wextra -Werror -Wno-missing-field-initializers
ALL_CFLAGS = $(CFLAGS) $(WARN) -std=c11 -D_GNU_SOURCE -pthread $(SAN)
LDLIBS   = $(shell pkg-config --libs inih 2>/dev/null || echo -linih) -pthread

B       ?= build
BIN     ?= proxy
SRC      = auth.c config.c copy.c http.c http_parse.c pool.c stats.c upstream.c
OBJ      = $(SRC:%.c=$(B)/%.o)

# $(call need,PACKAGES): install with apt-get as root, or say what to install and stop.
need = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: installing $(1) with apt-get"; \
	  apt-get install -y -q $(1) >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q $(1) >/dev/null; }; \
	else echo "make: missing packages; run: sudo apt-get install $(1)" >&2; exit 1; fi

.PHONY: all run test asan tsan deps test-deps clean help
all: $(BIN)

help:
	@echo "make            build ./proxy"
	@echo "make run        build and run ./proxy -c proxy.ini"
	@echo "make test       unit and integration tests; ends with 'N passed, N failed'"
	@echo "make asan       the same tests against an AddressSanitizer+UBSan build"
	@echo "make tsan       the same tests against a ThreadSanitizer build"
	@echo "make clean"

deps:
	@pkg-config --exists inih 2>/dev/null || { $(call need,libinih-dev pkg-config); }

test-deps:
	@command -v python3 >/dev/null && command -v curl >/dev/null && command -v openssl >/dev/null \
	  || { $(call need,python3 curl openssl); }

$(B):
	mkdir -p $(B)

$(B)/%.o: %.c proxy.h | deps $(B)
	$(CC) $(ALL_CFLAGS) -c -o $@ $<

$(BIN): $(OBJ) $(B)/proxy.o
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LDLIBS)

$(B)/unit: tests/unit.c $(OBJ)
	$(CC) $(ALL_CFLAGS) -I. -o $@ $^ $(LDLIBS)

run: $(BIN)
	./$(BIN) -c proxy.ini

test: $(BIN) $(B)/unit | test-deps
	python3 tests/run.py --proxy ./$(BIN) --unit $(B)/unit

# Sanitizer builds live in their own directories so they never mix with ./proxy's objects.
asan:
	$(MAKE) --no-print-directory B=build/asan BIN=build/asan/proxy CFLAGS="-O1 -g" \
	  SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" test

tsan:
	$(MAKE) --no-print-directory B=build/tsan BIN=build/tsan/proxy CFLAGS="-O1 -g" \
	  SAN="-fsanitize=thread" test

clean:
	rm -rf build proxy
