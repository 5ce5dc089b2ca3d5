package route

// Startable orders the stopped machines of an app's service on q.Port that
// an edge may start for a request no started machine can take (autostart):
// stopped or suspended, with autostart, not cordoned — or started but
// draining (autostop is about to stop it; its host keeps it instead) — on a
// host that is not down. The order is the candidates' region order — the edge's region (or
// fly-prefer-region's) first, then nearer regions — then the closer host by
// RTT, a suspect host's after a live one's, ties broken by machine id so
// every request of a moment names the same machine first.
// fly-force-region and fly-force-instance-id narrow the list as they narrow
// the candidates. It fills out (capacity bounds the count, at most
// MaxCandidates) and allocates nothing.
func (t *Table) Startable(appName string, q Query, out []*Target) []*Target {
	out = out[:0]
	k := min(cap(out), MaxCandidates)
	a := t.apps[appName]
	if a == nil || k == 0 {
		return out
	}
	home := t.region
	if q.PreferRegion != "" {
		home = q.PreferRegion
	}
	if q.ForceRegion != "" {
		home = q.ForceRegion
	}
	offer := func(tg *Target) {
		if !tg.startable {
			return
		}
		if q.ForceInstance != "" && q.ForceInstance != tg.MachineID && q.ForceInstance != tg.InstanceID {
			return
		}
		if q.ForceRegion != "" && tg.Region != q.ForceRegion {
			return
		}
		for _, o := range out {
			if o.MachineID == tg.MachineID {
				return // one machine once, whatever ports it answers on
			}
		}
		n := len(out)
		if n == k {
			if !t.startsBefore(tg, out[n-1], home) {
				return
			}
			n--
		} else {
			out = out[:n+1]
		}
		i := n
		for i > 0 && t.startsBefore(tg, out[i-1], home) {
			out[i] = out[i-1]
			i--
		}
		out[i] = tg
	}
	if idx := a.byPort[q.Port]; len(idx) > 0 {
		for _, i := range idx {
			offer(&a.targets[i])
		}
	} else {
		for _, i := range a.ranges {
			if tg := &a.targets[i]; tg.lo <= q.Port && q.Port <= tg.hi {
				offer(tg)
			}
		}
	}
	return out
}

// startsBefore orders startable machines: home region first, then by
// region rank, a live host before a suspect one, lower RTT, machine id.
func (t *Table) startsBefore(a, b *Target, home string) bool {
	ra, rb := a.regionRank+1, b.regionRank+1
	if a.Region == home {
		ra = 0
	}
	if b.Region == home {
		rb = 0
	}
	switch {
	case ra != rb:
		return ra < rb
	case a.suspect != b.suspect:
		return !a.suspect
	case a.RTT != b.RTT:
		return a.RTT < b.RTT
	}
	return a.MachineID < b.MachineID
}

// Startable reports whether an edge may start the target's machine for a
// request (see Table.Startable).
func (tg *Target) Startable() bool { return tg.startable }
