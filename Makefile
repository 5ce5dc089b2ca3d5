# Flame's build entry points. `make test` is what CI runs.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: all build test check bench dev

all: check test

build:
	go build -o bin/flame ./cmd/flame

test:
	go test ./...

# check: formatting, vet, staticcheck and a tidy go.mod.
check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	go run $(STATICCHECK) ./...
	go mod tidy -diff

bench:
	go test -run '^$$' -bench . -benchtime 200x ./internal/host/

dev:
	go run ./cmd/flame dev
