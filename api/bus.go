package api

import "strings"

// The event bus (the catalog's NATS) carries each host's machine events and
// log lines on subjects that name the host, so a host's credential can be
// limited to its own subjects: events.<host>.<app>.<machine> and
// logs.<host>.<app>.<machine>.

// BusHost is a host id as one subject token: ids may hold dots, which
// would split it ("a.b" must not pass for host "a" with app "b").
func BusHost(hostID string) string {
	if hostID == "" {
		return "-"
	}
	return strings.ReplaceAll(hostID, ".", "~")
}

// EventSubject is the subject of a machine's events.
func EventSubject(hostID, app, machineID string) string {
	return "events." + BusHost(hostID) + "." + app + "." + machineID
}

// LogSubject is the subject of a machine's log lines.
func LogSubject(hostID, app, machineID string) string {
	return "logs." + BusHost(hostID) + "." + app + "." + machineID
}

// AppEventsSubject and AppLogsSubject match every host's subjects of an
// app.
func AppEventsSubject(app string) string { return "events.*." + app + ".>" }
func AppLogsSubject(app string) string   { return "logs.*." + app + ".>" }

// HostBusSubjects are the subjects a host may publish on: its own.
func HostBusSubjects(hostID string) []string {
	return []string{"events." + BusHost(hostID) + ".>", "logs." + BusHost(hostID) + ".>"}
}
