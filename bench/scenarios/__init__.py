"""bench/scenarios/ — one module per scenario, each holding all of it, so that a scenario is
described and changed in one place. A scenario module defines:

    NUMBER      its number: what --only takes, its report section's number, and the key of
                its results (and of its commands) in the JSON file
    TITLE       its name in the progress log
    HEADING     its section heading in the report
    NOTE        what it measures and how, as the report's note under the heading says it
    HEADLINE    (optional) its rows of the report's headline table, each (label, column,
                key, format) for the TCP systems
    run(b)      starts its systems, drives the load and adds every run to b.results, with
                the command lines it ran (b is a common.Bench)
    report(rep) its report section in markdown (rep is a report.Report)

SCENARIOS below is the one list of them, in number order: the order they run in and the
order of the report's sections.
"""

from scenarios import (bulk, burst, busy, cliff, connrate, echo_scale, http_auth, idle,
                       latency, many_clients, memory, slow_clients, sweep, throughput, wakeups)

SCENARIOS = [latency, sweep, throughput, connrate, bulk, http_auth, memory, cliff, idle,
             echo_scale, busy, many_clients, burst, slow_clients, wakeups]
