package api

import (
	"encoding/json"
	"testing"
)

// fuzzSeeds are documents worth starting a decoder fuzz from: the quirks of
// Fly's JSON in small pieces.
var fuzzSeeds = []string{
	`{}`,
	`null`,
	`{"image":"nginx","init":{}}`,
	`{"services":[{"autostop":true},{"autostop":false},{"autostop":"off"},{"autostop":"stop"},{"autostop":"suspend"},{"autostop":null}]}`,
	`{"services":[{"autostop":"sometimes"}]}`,
	`{"checks":{"a":{"interval":"10s","timeout":10000000000,"grace_period":1.5e9}}}`,
	`{"stop_config":{"timeout":-9223372036854775808,"signal":"SIGINT"}}`,
	`{"stop_config":{"timeout":1e300}}`,
	`{"services":[{"ports":[{"start_port":1,"end_port":2,"http_options":{"response":{"headers":{"a":[1,{"b":null}],"c":1e400}}}}]}]}`,
	`{"env":{},"mounts":[],"files":[null],"statics":[null],"metadata":{"":""}}`,
	`{"IMAGE":"upper","image":"lower"}`,
	"{\"image\":\"\\ud800\\udc00\u00e9\xff\"}", // surrogates, and a byte that is not UTF-8
}

// fuzzRoundTrip is the property every decoder must keep: data either fails
// to decode, or decodes into a value that encodes, decodes back to the same
// value and encodes to the same bytes. Nothing may panic.
func fuzzRoundTrip[T any](t *testing.T, data []byte) {
	var v T
	if err := json.Unmarshal(data, &v); err != nil {
		return
	}
	roundTrip[T](t, data)
}

func FuzzMachineConfig(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	var m struct {
		Config json.RawMessage `json:"config"`
	}
	for _, name := range []string{"machine.json", "launch_input.json"} {
		if err := json.Unmarshal(readTestdata(f, name), &m); err != nil {
			f.Fatal(err)
		}
		f.Add([]byte(m.Config))
	}
	f.Fuzz(fuzzRoundTrip[MachineConfig])
}

func FuzzLaunchMachineInput(f *testing.F) {
	f.Add(readTestdata(f, "launch_input.json"))
	f.Add([]byte(`{"config":null,"region":"ams","min_secrets_version":18446744073709551615,"lease_ttl":-1}`))
	f.Add([]byte(`{"config":{"image":"x","services":[{"autostop":"suspend"}]},"skip_secrets":false}`))
	for _, s := range fuzzSeeds {
		f.Add([]byte(`{"config":` + s + `}`))
	}
	f.Fuzz(fuzzRoundTrip[LaunchMachineInput])
}

func FuzzMachine(f *testing.F) {
	f.Add(readTestdata(f, "machine.json"))
	f.Add([]byte(`{"id":"x","events":[{"timestamp":1,"request":{"exit_event":{"exited_at":"2024-03-01T10:18:19.5+01:00"}}}]}`))
	f.Fuzz(fuzzRoundTrip[Machine])
}
