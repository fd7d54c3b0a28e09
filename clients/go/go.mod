module github.com/parslee-ai/car-grpc/clients/go

// Go 1.19 and these versions are Debian bookworm's (golang-go, golang-google-grpc-dev,
// golang-google-protobuf-dev): scripts/setup_go.sh installs them and links their sources
// into vendor/, so the module builds with -mod=vendor and downloads nothing. Elsewhere,
// `go mod tidy` fetches the same versions (or newer) from the module proxy.
go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
