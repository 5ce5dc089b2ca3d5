// Package check runs a machine's health checks — the services[].checks that
// gate the proxy's routing and the top-level checks that only report — and
// keeps each one's status.
//
// Specs turns a machine config into check specs. A Runner probes each spec
// on its own schedule against the machine's address and reports statuses
// through OnChange, only when a status or its output changes. Decide, the
// pure core, says what a check's status is from its history, its grace
// period and the time.
//
// Statuses follow Fly's vocabulary (api.CheckPassing, CheckWarning,
// CheckCritical):
//
//   - Before the first result a check is warning ("waiting for the first
//     check").
//   - A passing probe makes it passing: a tcp check passes when the port
//     accepts a connection; an http check when the response status is 2xx
//     or 3xx (redirects are not followed).
//   - A failing probe makes it critical — except during the grace period,
//     counted from Start, until the check has passed once: then it is
//     warning, so a machine that is still booting is not reported
//     unhealthy. Fly describes grace_period as the time to wait after a
//     machine starts before checking; Flame probes during it too, so a
//     machine that is ready early passes early, and only excuses failures.
//   - When the grace period runs out on a failing check it turns critical
//     without waiting for the next probe.
//
// The output is what the last probe saw: "connected" or the dial error for
// tcp, the status line and the start of the body (or the error) for http,
// "timed out after <timeout>" when the probe ran out of time.
//
// Scheduling: each check first runs after a random delay below
// min(interval, 1 s), so the checks of machines started together do not fire
// in lockstep while a new machine is still found ready quickly; after that it
// runs every interval on a fixed schedule (a slow probe skips the runs it
// overlapped, it never causes a burst).
package check
