# Flame's build entry points. CI runs .ci/run: what `make check` and
# `make test` run, on a fresh machine that has no make.

.PHONY: all build test check bench dev

all: check test

build:
	go build -o bin/flame ./cmd/flame

test:
	go test ./...

# check: formatting, vet, staticcheck and a tidy go.mod (listed in .ci/check).
check:
	.ci/check

bench:
	go test -run '^$$' -bench . -benchtime 200x ./internal/host/

dev:
	go run ./cmd/flame dev
