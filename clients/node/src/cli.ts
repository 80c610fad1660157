#!/usr/bin/env node
/**
 * modelserve-node: stream a completion or a chat reply to stdout as it is generated.
 *
 *   node dist/cli.js generate "Hello" --max-new-tokens 32 --temperature 0
 *   node dist/cli.js chat "What is gRPC?" --system "Answer briefly." --target host:50051 --token T
 *
 * Exit codes: 0 done, 1 the server answered with an error status (or could not be reached), 2 bad usage,
 * 130 Ctrl-C (the call is cancelled, so the server stops generating).
 */
import { type ServiceError, status } from "@grpc/grpc-js";
import { parseArgs } from "node:util";
import { type ChatMessage, FinishReason, type GenerateResponse, ModelServeClient } from "./client";

const USAGE = `usage: modelserve-node [options] generate PROMPT | chat MESSAGE

options:
  --target HOST:PORT      the server (default 127.0.0.1:50051)
  --token TOKEN           bearer token (default: $MODELSERVE_AUTH_TOKEN)
  --timeout SECONDS       deadline for the call
  --max-new-tokens N      --temperature T (0 = greedy)   --top-p P   --top-k K   --seed N
  --stop TEXT             stop sequence (repeatable)     --ignore-eos
  --system TEXT           chat: a system message before MESSAGE
  -v, --verbose           after the text, print the finish reason and token counts on stderr`;

class UsageError extends Error {}

function parse(argv: string[]) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        target: { type: "string", default: "127.0.0.1:50051" },
        token: { type: "string" },
        timeout: { type: "string" },
        "max-new-tokens": { type: "string" },
        temperature: { type: "string" },
        "top-p": { type: "string" },
        "top-k": { type: "string" },
        seed: { type: "string" },
        stop: { type: "string", multiple: true, default: [] },
        "ignore-eos": { type: "boolean", default: false },
        system: { type: "string" },
        verbose: { type: "boolean", short: "v", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
  const { values, positionals } = parsed;
  const [command, text, ...extra] = positionals;
  if (!values.help && ((command !== "generate" && command !== "chat") || text === undefined || extra.length > 0)) {
    throw new UsageError("give one command, generate or chat, and one text");
  }
  const number = (flag: keyof typeof values): number | undefined => {
    const value = values[flag] as string | undefined;
    if (value === undefined) return undefined;
    if (value.trim() === "" || Number.isNaN(Number(value))) throw new UsageError(`--${flag}: '${value}' is not a number`);
    return Number(value);
  };
  const seed = values.seed;
  if (seed !== undefined && !/^\d+$/.test(seed)) throw new UsageError(`--seed: '${seed}' is not a whole number`);
  return {
    command,
    text,
    values,
    timeoutS: number("timeout"),
    params: {
      maxNewTokens: number("max-new-tokens"),
      temperature: number("temperature"),
      topP: number("top-p"),
      topK: number("top-k"),
      seed: seed === undefined ? undefined : BigInt(seed),
      stop: values.stop,
      ignoreEos: values["ignore-eos"],
    },
  };
}

function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as Partial<ServiceError>).code === "number";
}

async function main(argv: string[]): Promise<number> {
  let args;
  try {
    args = parse(argv);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`error: ${error.message} (--help shows the usage)`);
    return 2;
  }
  const { command, text, values, params } = args;
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const client = new ModelServeClient(values.target, {
    token: values.token ?? process.env.MODELSERVE_AUTH_TOKEN,
    timeoutS: args.timeoutS,
  });
  const abort = new AbortController(); // Ctrl-C cancels the call, so the server stops generating
  process.once("SIGINT", () => abort.abort());
  const messages: Partial<ChatMessage>[] = [
    ...(values.system === undefined ? [] : [{ role: "system", content: values.system }]),
    { role: "user", content: text },
  ];
  const stream =
    command === "generate"
      ? client.generate(text, params, { signal: abort.signal })
      : client.chat(messages, params, { signal: abort.signal });
  let last: GenerateResponse | undefined;
  let written = false;
  try {
    for await (const message of stream) {
      if (message.text) {
        process.stdout.write(message.text);
        written = true;
      }
      last = message;
    }
  } catch (error) {
    if (!isServiceError(error)) throw error;
    if (written) process.stdout.write("\n");
    if (abort.signal.aborted) return 130; // Ctrl-C: 128 + SIGINT, as a shell reports it
    console.error(`error: ${status[error.code]}: ${error.details}`);
    return 1;
  } finally {
    client.close();
  }
  process.stdout.write("\n");
  if (values.verbose && last) {
    const reason = FinishReason[last.finishReason].replace("FINISH_REASON_", "");
    console.error(`${reason} | ${last.usage?.inputTokens} in, ${last.usage?.outputTokens} out | seed ${last.seed}`);
  }
  return 0;
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
