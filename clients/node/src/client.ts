/**
 * A small client for modelserve's GenerationService on @grpc/grpc-js: Generate and Chat, streamed.
 *
 * The message and service types come from ./gen (ts-proto, generated from protos/ by `make proto`;
 * never edit them). Each stream yields the server's GenerateResponse messages as they arrive: the
 * first carries requestId and usage.inputTokens, the next ones text deltas, the last finishReason,
 * usage and timings. `texts()` keeps only the text deltas.
 */
import { type ChannelCredentials, credentials, type ClientReadableStream, Metadata } from "@grpc/grpc-js";
import {
  type ChatMessage,
  ChatRequest,
  FinishReason,
  GenerateRequest,
  type GenerateResponse,
  GenerationParameters,
  GenerationServiceClient,
} from "./gen/modelserve/v1/generation";

export { FinishReason, type ChatMessage, type GenerateResponse, GenerationParameters, GenerationServiceClient };

export interface ClientOptions {
  /** Sent as `authorization: Bearer <token>` with every call (the server's --auth-token). */
  token?: string;
  /** TLS credentials (`credentials.createSsl(ca)`); plain text when unset. */
  credentials?: ChannelCredentials;
  /** Seconds each call may take; none when unset. */
  timeoutS?: number;
}

/** What a call may set besides the parameters. */
export interface CallOptions {
  requestId?: string;
  priority?: number;
  /** The LoRA adapter to generate with, by the name the server loaded it under; unset: the base model. */
  adapter?: string;
  /** Cancels the call (the server stops generating at its next step). */
  signal?: AbortSignal;
}

export class ModelServeClient {
  private readonly stub: GenerationServiceClient;

  constructor(
    target: string,
    private readonly options: ClientOptions = {},
  ) {
    this.stub = new GenerationServiceClient(target, options.credentials ?? credentials.createInsecure());
  }

  /** Streams the completion of one prompt. */
  generate(
    prompt: string,
    params: Partial<GenerationParameters> = {},
    call: CallOptions = {},
  ): AsyncGenerator<GenerateResponse> {
    const request = GenerateRequest.fromPartial({
      prompt,
      params,
      requestId: call.requestId,
      priority: call.priority,
      adapter: call.adapter,
    });
    return this.stream((metadata, deadline) => this.stub.generate(request, metadata, { deadline }), call.signal);
  }

  /** Streams the assistant's next reply to a conversation, laid out by the model's chat template. */
  chat(
    messages: Partial<ChatMessage>[],
    params: Partial<GenerationParameters> = {},
    call: CallOptions = {},
  ): AsyncGenerator<GenerateResponse> {
    const request = ChatRequest.fromPartial({
      messages,
      params,
      requestId: call.requestId,
      priority: call.priority,
      adapter: call.adapter,
    });
    return this.stream((metadata, deadline) => this.stub.chat(request, metadata, { deadline }), call.signal);
  }

  close(): void {
    this.stub.close();
  }

  private async *stream(
    start: (metadata: Metadata, deadline: Date | undefined) => ClientReadableStream<GenerateResponse>,
    signal?: AbortSignal,
  ): AsyncGenerator<GenerateResponse> {
    const metadata = new Metadata();
    if (this.options.token) metadata.set("authorization", `Bearer ${this.options.token}`);
    const deadline = this.options.timeoutS ? new Date(Date.now() + this.options.timeoutS * 1000) : undefined;
    const call = start(metadata, deadline);
    const cancel = (): void => call.cancel();
    signal?.addEventListener("abort", cancel, { once: true });
    try {
      // A grpc-js stream is a Node Readable: iterating it yields each message, and throws the
      // call's ServiceError (with .code and .details) if it ends with an error status.
      for await (const message of call) yield message as GenerateResponse;
    } finally {
      signal?.removeEventListener("abort", cancel);
      call.cancel(); // a no-op once the stream has ended; stops generation if the caller broke off early
    }
  }
}

/** Only the text deltas of a stream. */
export async function* texts(stream: AsyncIterable<GenerateResponse>): AsyncGenerator<string> {
  for await (const message of stream) if (message.text) yield message.text;
}
