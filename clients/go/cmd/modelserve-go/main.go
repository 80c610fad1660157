// Command modelserve-go streams a completion or a chat reply to stdout as it is generated: the Go
// counterpart of the Python and Node clients' CLIs, and a working example of the generated stubs
// (clients/go/gen, from protos/ by buf.gen.yaml).
//
//	modelserve-go generate "Hello" -max-new-tokens 32 -temperature 0
//	modelserve-go chat "What is gRPC?" -system "Answer briefly." -target host:50051 -token T
//
// Flags may come before or after the command and its text. Exit codes: 0 done, 1 the server answered
// with an error status (or could not be reached), 2 bad usage, 130 Ctrl-C (the call is cancelled, so
// the server stops generating).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"time"
	"unicode"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "modelserve/clients/go/gen/modelserve/v1"
)

const usage = `usage: modelserve-go [flags] generate PROMPT | chat MESSAGE

flags:
  -target HOST:PORT      the server (default 127.0.0.1:50051)
  -token TOKEN           bearer token (default: $MODELSERVE_AUTH_TOKEN)
  -timeout SECONDS       deadline for the call
  -max-new-tokens N      -temperature T (0 = greedy)   -top-p P   -top-k K   -seed N
  -stop TEXT             stop sequence (repeatable)    -ignore-eos
  -system TEXT           chat: a system message before MESSAGE
  -v, -verbose           after the text, print the finish reason and token counts on stderr`

type stops []string

func (s *stops) String() string     { return strings.Join(*s, ",") }
func (s *stops) Set(v string) error { *s = append(*s, v); return nil }

// options is what the command line asks for.
type options struct {
	command, text, target, token, system string
	timeout                              time.Duration
	verbose                              bool
	params                               *pb.GenerationParameters
}

func parse(args []string) (*options, error) {
	o := &options{params: &pb.GenerationParameters{}}
	fs := flag.NewFlagSet("modelserve-go", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported once, by main
	fs.StringVar(&o.target, "target", "127.0.0.1:50051", "")
	fs.StringVar(&o.token, "token", os.Getenv("MODELSERVE_AUTH_TOKEN"), "")
	fs.StringVar(&o.system, "system", "", "")
	fs.BoolVar(&o.verbose, "v", false, "")
	fs.BoolVar(&o.verbose, "verbose", false, "")
	fs.BoolVar(&o.params.IgnoreEos, "ignore-eos", false, "")
	fs.Var((*stops)(&o.params.Stop), "stop", "")
	fs.Func("timeout", "", func(v string) error {
		seconds, err := strconv.ParseFloat(v, 64)
		if err != nil || seconds <= 0 {
			return fmt.Errorf("'%s' is not a positive number of seconds", v)
		}
		o.timeout = time.Duration(seconds * float64(time.Second))
		return nil
	})
	fs.Func("max-new-tokens", "", func(v string) error { return setInt32(&o.params.MaxNewTokens, v) })
	fs.Func("top-k", "", func(v string) error { return setInt32(&o.params.TopK, v) })
	fs.Func("temperature", "", func(v string) error { return setFloat32(&o.params.Temperature, v) })
	fs.Func("top-p", "", func(v string) error { return setFloat32(&o.params.TopP, v) })
	fs.Func("seed", "", func(v string) error {
		seed, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return fmt.Errorf("'%s' is not a whole number", v)
		}
		o.params.Seed = &seed
		return nil
	})
	var positionals []string
	for { // flag stops at the first positional: parse again after each one, so flags may follow them
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if args = fs.Args(); len(args) == 0 {
			break
		}
		positionals, args = append(positionals, args[0]), args[1:]
	}
	if len(positionals) != 2 || (positionals[0] != "generate" && positionals[0] != "chat") {
		return nil, errors.New("give one command, generate or chat, and one text")
	}
	o.command, o.text = positionals[0], positionals[1]
	return o, nil
}

func setInt32(field **int32, v string) error {
	n, err := strconv.ParseInt(v, 10, 32)
	if err != nil {
		return fmt.Errorf("'%s' is not a whole number", v)
	}
	value := int32(n)
	*field = &value
	return nil
}

func setFloat32(field **float32, v string) error {
	f, err := strconv.ParseFloat(v, 32)
	if err != nil {
		return fmt.Errorf("'%s' is not a number", v)
	}
	value := float32(f)
	*field = &value
	return nil
}

// open starts the call: a Generate for a prompt, a Chat for a message (after the system one, if any).
func open(ctx context.Context, client pb.GenerationServiceClient, o *options) (interface {
	Recv() (*pb.GenerateResponse, error)
}, error) {
	if o.command == "generate" {
		return client.Generate(ctx, &pb.GenerateRequest{Prompt: o.text, Params: o.params})
	}
	var messages []*pb.ChatMessage
	if o.system != "" {
		messages = append(messages, &pb.ChatMessage{Role: "system", Content: o.system})
	}
	messages = append(messages, &pb.ChatMessage{Role: "user", Content: o.text})
	return client.Chat(ctx, &pb.ChatRequest{Messages: messages, Params: o.params})
}

func run(args []string) int {
	o, err := parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Println(usage)
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v (-h shows the usage)\n", err)
		return 2
	}
	// WithInsecure: plaintext, as the other clients default to; it exists in every grpc-go release.
	conn, err := grpc.Dial(o.target, grpc.WithInsecure()) //nolint:staticcheck
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return 1
	}
	defer conn.Close()

	// Ctrl-C cancels the call, so the server stops generating; a second one ends the process at once.
	interrupt, stop := context.WithCancel(context.Background())
	defer stop()
	interrupted := make(chan os.Signal, 1)
	signal.Notify(interrupted, os.Interrupt)
	go func() {
		<-interrupted
		signal.Stop(interrupted)
		stop()
	}()
	ctx := interrupt
	if o.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
		defer cancel()
	}
	if o.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+o.token)
	}

	stream, err := open(ctx, pb.NewGenerationServiceClient(conn), o)
	var last *pb.GenerateResponse
	written := false
	for err == nil {
		var message *pb.GenerateResponse
		if message, err = stream.Recv(); err == nil {
			if message.Text != "" {
				os.Stdout.WriteString(message.Text)
				written = true
			}
			last = message
		}
	}
	if err != io.EOF {
		if written {
			os.Stdout.WriteString("\n")
		}
		if interrupt.Err() != nil {
			return 130 // Ctrl-C: 128 + SIGINT, as a shell reports it
		}
		s := status.Convert(err)
		fmt.Fprintf(os.Stderr, "error: %s: %s\n", codeName(s.Code()), s.Message())
		return 1
	}
	os.Stdout.WriteString("\n")
	if o.verbose && last != nil {
		reason := strings.TrimPrefix(last.FinishReason.String(), "FINISH_REASON_")
		counts := last.GetUsage()
		fmt.Fprintf(os.Stderr, "%s | %d in, %d out | seed %d\n", reason, counts.GetInputTokens(), counts.GetOutputTokens(), last.Seed)
	}
	return 0
}

// codeName spells a status code as gRPC's documents do (UNAUTHENTICATED), as the other clients print it.
func codeName(code codes.Code) string {
	var name strings.Builder
	previous := ' '
	for _, r := range code.String() {
		if unicode.IsUpper(r) && unicode.IsLower(previous) {
			name.WriteByte('_')
		}
		name.WriteRune(unicode.ToUpper(r))
		previous = r
	}
	return name.String()
}

func main() {
	os.Exit(run(os.Args[1:]))
}
