// The Go client of modelserve: the stubs generated from protos/ (gen/, by buf.gen.yaml) and a CLI
// (cmd/modelserve-go). The versions are the oldest the generated code needs; newer ones work. No go.sum
// is committed (it was written offline, against Debian's sources): `go mod tidy` fetches and pins them.
module modelserve/clients/go

go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
