/* running.c — the config in force: the snapshots a reload publishes, the rule for freeing them,
 * and the upstreams' health, which outlives a snapshot. config.c reads the file; this file
 * decides which reading connections are served by. */
#include "proxy.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define STATES (4 * MAX_UPSTREAMS) /* upstream names listed by the snapshots alive at once */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; /* newest, and states' holders */
static struct config *newest = &cfg;
static _Atomic uint64_t generation = 1; /* newest's, to be read without the lock */
static struct upstream_state states[STATES];

/* Lets go of the health of c's upstreams: a state no snapshot lists is free. Under mu. */
static void let_go_states(struct config *c, int n) {
    for (int i = 0; i < n; i++) c->up[i].st->holders--;
}

/* Gives each upstream of c its health: the state of the same name if a snapshot alive lists
 * it (so a reload keeps it), else a free one, fresh. Returns 0, or -1 when none is free. Under
 * mu. */
static int adopt_states(struct config *c) {
    for (int i = 0; i < c->nup; i++) {
        struct upstream_state *same = NULL, *spare = NULL;
        for (int k = 0; k < STATES && !same; k++) {
            if (states[k].holders && !strcmp(states[k].name, c->up[i].name)) same = &states[k];
            if (!states[k].holders && !spare) spare = &states[k];
        }
        if (!same && !spare) {
            let_go_states(c, i);
            return -1;
        }
        if (!same) {
            same = spare;
            snprintf(same->name, sizeof same->name, "%s", c->up[i].name);
            atomic_store(&same->down_until, 0);
            atomic_store(&same->connects, 0);
            atomic_store(&same->failures, 0);
        }
        same->holders++;
        c->up[i].st = same;
    }
    return 0;
}

void config_start(void) {
    pthread_mutex_lock(&mu);
    adopt_states(&cfg); /* cannot fail: MAX_UPSTREAMS < STATES */
    cfg.generation = 1;
    atomic_store(&cfg.refs, 2); /* newest's, and one nobody drops: cfg is not on the heap */
    pthread_mutex_unlock(&mu);
}

struct config *config_hold(void) {
    pthread_mutex_lock(&mu);
    struct config *c = newest;
    atomic_fetch_add(&c->refs, 1);
    pthread_mutex_unlock(&mu);
    return c;
}

void config_drop(struct config *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    pthread_mutex_lock(&mu);
    let_go_states(c, c->nup);
    pthread_mutex_unlock(&mu);
    config_free(c);
    free(c);
}

void config_refresh(struct config **c) {
    if ((*c)->generation == atomic_load(&generation)) return;
    struct config *now = config_hold();
    config_drop(*c);
    *c = now;
}

uint64_t config_generation(void) {
    return atomic_load(&generation);
}

int config_reload(char *err, size_t errlen, char *note, size_t notelen) {
    struct config *c = malloc(sizeof *c);
    note[0] = 0;
    if (!c) {
        snprintf(err, errlen, "%s: cannot reload: out of memory", cfg.file);
        return -1;
    }
    /* A failed load leaves no lists: config_free then has nothing to free. */
    if (config_load_keeping(c, cfg.file, &cfg, note, notelen, err, errlen) < 0 ||
        config_check_log(c, err, errlen) < 0) {
        config_free(c);
        free(c);
        return -1;
    }
    pthread_mutex_lock(&mu);
    if (adopt_states(c) < 0) {
        pthread_mutex_unlock(&mu);
        snprintf(err, errlen,
                 "%s: cannot reload: connections still hold configs listing %d upstreams in all;"
                 " try again once they close",
                 cfg.file, STATES);
        config_free(c);
        free(c);
        return -1;
    }
    struct config *old = newest;
    c->generation = old->generation + 1;
    atomic_store(&c->refs, 1); /* newest's */
    newest = c;
    atomic_store(&generation, c->generation);
    pthread_mutex_unlock(&mu);
    config_drop(old);
    return 0;
}
