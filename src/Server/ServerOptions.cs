using System.Globalization;
using LocalVllm.Engine;
using System.Text.Json.Nodes;

namespace LocalVllm.Server;

/// <summary>
/// The server's command line, named as <c>vllm serve</c> names its flags: <c>--model</c> (required), <c>--host</c>,
/// <c>--port</c>, <c>--api-key</c>, <c>--served-model-name</c> and the engine's options.
/// </summary>
public sealed class ServerOptions
{
    public string Model { get; set; } = "";
    public string? ServedModelName { get; set; }
    /// <summary>The address to listen on; 127.0.0.1 unless told otherwise.</summary>
    public string Host { get; set; } = "127.0.0.1";
    /// <summary>The port; 0 picks a free one (tests).</summary>
    public int Port { get; set; } = 8000;
    /// <summary>When set, every <c>/v1</c>, <c>/tokenize</c> and <c>/detokenize</c> call needs <c>Authorization: Bearer KEY</c>.</summary>
    public string? ApiKey { get; set; }
    /// <summary>The largest request body accepted, in bytes.</summary>
    public long MaxRequestBodyBytes { get; set; } = 32L << 20;
    /// <summary>
    /// On shutdown (SIGTERM, Ctrl+C) the server stops accepting at once, lets in-flight requests finish for this long,
    /// then aborts the rest (their KV blocks are freed) and exits.
    /// </summary>
    public TimeSpan ShutdownTimeout { get; set; } = TimeSpan.FromSeconds(30);
    public EngineOptions Engine { get; set; } = new();
    /// <summary>
    /// vLLM's <c>--tool-call-parser</c> (hermes or llama3_json). The chat template decides how calls are parsed; when
    /// this is set, the server refuses to start if the template writes calls the other way.
    /// </summary>
    public string? ToolCallParser { get; set; }
    /// <summary>
    /// Cross-origin requests (CORS), as vLLM's <c>--allowed-origins</c>, <c>--allowed-methods</c>,
    /// <c>--allowed-headers</c> and <c>--allow-credentials</c>, with vLLM's defaults: every origin, method and header, no
    /// credentials. A browser page can then call the server directly; the API key, when set, still guards /v1.
    /// </summary>
    public List<string> AllowedOrigins { get; set; } = ["*"];
    public List<string> AllowedMethods { get; set; } = ["*"];
    public List<string> AllowedHeaders { get; set; } = ["*"];
    public bool AllowCredentials { get; set; }
    /// <summary>
    /// Serve HTTP/2 without TLS (prior knowledge, h2c) instead of HTTP/1.1: many streams share one connection, so a proxy
    /// or client that multiplexes sends one socket write for the events of many streams. With TLS, HTTP/2 is offered
    /// beside HTTP/1.1 (ALPN) whatever this says.
    /// </summary>
    public bool Http2Cleartext { get; set; }
    /// <summary>
    /// Keep responses of <c>/v1/responses</c> that ask to be stored (OpenAI's default) in memory, up to this many (the
    /// oldest go first), so that <c>previous_response_id</c>, GET and DELETE by id work (vLLM's
    /// <c>VLLM_ENABLE_RESPONSES_API_STORE</c>). 0 (the default): nothing is kept and every response says it was not stored.
    /// </summary>
    public int ResponsesStoreSize { get; set; }

    /// <summary>
    /// Serve <c>POST /v1/load_lora_adapter</c> and <c>/v1/unload_lora_adapter</c> (vLLM's, when the environment variable
    /// <c>VLLM_ALLOW_RUNTIME_LORA_UPDATING</c> is true, as it is read here too).
    /// </summary>
    public bool AllowRuntimeLoraUpdating { get; set; }

    /// <summary>LoRA adapters served beside the model (<c>--lora-modules</c>); a request names one as its <c>model</c>.</summary>
    public List<LoraRequest> LoraModules { get; } = [];
    /// <summary>HTTPS, as vLLM's <c>--ssl-certfile</c> and <c>--ssl-keyfile</c>: PEM files of the certificate and its key.</summary>
    public string? SslCertFile { get; set; }
    public string? SslKeyFile { get; set; }
    /// <summary>
    /// vLLM's <c>--root-path</c>: the path prefix a reverse proxy puts in front of the server's routes (e.g. <c>/llm</c>);
    /// requests under it are served as if it were not there (requests without it still are).
    /// </summary>
    public string? RootPath { get; set; }

    public const string Usage = """
        usage: dotnet run --project src/Server -- [--model] <dir or owner/name> [options]

          --model M                   a Hugging Face model directory or hub repository id (required)
          --served-model-name N       the model name clients send and see (default: the directory or repo name)
          --host H                    address to listen on (default 127.0.0.1)
          --port P                    port (default 8000)
          --api-key KEY               require 'Authorization: Bearer KEY' (default: $VLLM_API_KEY when set)
          --max-num-seqs N            sequences running at once (default 128)
          --max-num-batched-tokens N  token budget per engine step (default 2048)
          --block-size N              tokens per KV block (default 16)
          --max-model-len N           context length cap (default: the model's)
          --kv-cache-memory BYTES     KV cache size, e.g. 2G or 512M (default: half the free memory, at most 4 GiB)
          --num-gpu-blocks-override N KV cache size in blocks
          --max-waiting-requests N    waiting requests before new ones get 429 (default 4096)
          --dtype T                   float32 | bfloat16 | float16 (default float32)
          --weight-dtype T            auto | float32 | bfloat16: how float32 compute on the CPU keeps the matrices
                                      (default auto: a bf16 checkpoint stays bf16)
          --quantization Q            int8: quantize the matrices at load (groups of 32, as llama.cpp's Q8_0)
          --device D                  cpu | cuda (default cpu)
          --no-enable-prefix-caching  turn the prefix cache off
          --scheduling-policy P       fcfs (default) | priority: requests' "priority" field orders admission and preemption
          --stream-interval N         tokens a stream gathers per event after its first (default 1: every token at once)
          --max-logprobs N            most log-probabilities per position a request may ask for (default 20; -1: no cap)
          --chat-template T           a Jinja chat template file, or the template itself, instead of the model's own
          --generation-config G       where unset sampling settings come from: auto (the model's generation_config.json,
                                      the default), vllm (none: temperature 1, no cuts), or a folder holding one
          --override-generation-config JSON  sampling defaults laid over those, e.g. '{"temperature": 0.5}'
                                      (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens)
          --seed N                    seed the random streams of requests that have none (same requests, same order:
                                      same tokens from run to run)
          --download-dir D            where hub downloads go (default: the Hugging Face cache); --hf-token T for gated ones
          --tensor-parallel-size 1    accepted as 1 (also -pp, -dp): one engine on one device per server
          --enable-chunked-prefill, --enforce-eager, --trust-remote-code
                                      accepted: chunked prefill is always on, nothing is graph-captured, and no model
                                      code is ever run from a repository
          --enable-lora               serve LoRA adapters; --lora-modules name=path [name=path ...] (or JSON objects
                                      with name and path) names them, and a request's "model" picks one; --max-loras N
                                      adapters per batch (1), --max-lora-rank R (16), --max-cpu-loras N kept loaded
                                      (VLLM_ALLOW_RUNTIME_LORA_UPDATING=true: POST /v1/load_lora_adapter and
                                      /v1/unload_lora_adapter add and drop adapters while serving)
          --speculative-config JSON   speculative decoding by prompt lookup (greedy output unchanged), e.g.
                                      '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'
          --enable-auto-tool-choice   accepted as in vLLM: tool calls are always parsed when a request has tools
          --tool-call-parser P        hermes | llama3_json | mistral: checked against the format the chat template
                                      writes (<tool_call> blocks, Qwen's; a bare JSON call, Llama 3's; [TOOL_CALLS]
                                      and a JSON array, Mistral's), which is parsed
          --reasoning-parser P        qwen3 | deepseek_r1: <think>...</think> becomes reasoning_content (always on)
          --allowed-origins JSON      CORS origins, a JSON list (default ["*"]); --allowed-methods, --allowed-headers
                                      likewise (default ["*"]); --allow-credentials lets browsers send credentials
          --ssl-certfile F --ssl-keyfile K  serve HTTPS with this PEM certificate and key (HTTP/1.1 and HTTP/2)
          --http2                     serve HTTP/2 without TLS (prior knowledge) instead of HTTP/1.1
          --enable-responses-store    keep the last 1,000 stored /v1/responses in memory (previous_response_id, GET and
                                      DELETE by id); --responses-store-size N keeps N
          --root-path P               the path prefix of a reverse proxy in front (e.g. /llm)
          --shutdown-timeout SECONDS  on SIGTERM, how long in-flight requests may finish before they are aborted (default 30)
        """;

    /// <summary>
    /// Parses <paramref name="args"/>; throws <see cref="ArgumentException"/> naming the flag that is wrong. As in
    /// <c>vllm serve</c>, the model may come first without <c>--model</c>, and without <c>--api-key</c> the key is read
    /// from the environment variable <c>VLLM_API_KEY</c> (through <paramref name="environment"/>; the process's by default).
    /// </summary>
    public static ServerOptions Parse(IReadOnlyList<string> args, Func<string, string?>? environment = null)
    {
        var o = new ServerOptions();
        int first = 0;
        if (args.Count > 0 && !args[0].StartsWith('-'))
        {
            o.Model = args[0];
            first = 1;
        }
        for (int i = first; i < args.Count; i++)
        {
            string flag = args[i];
            string? inline = null;
            int eq = flag.IndexOf('=');
            if (flag.StartsWith("--", StringComparison.Ordinal) && eq > 0) { inline = flag[(eq + 1)..]; flag = flag[..eq]; }
            string Value()
            {
                if (inline is not null) return inline;
                if (i + 1 >= args.Count || args[i + 1].StartsWith("--", StringComparison.Ordinal)) throw new ArgumentException($"{flag} needs a value.");
                return args[++i];
            }
            int Int() => int.TryParse(Value(), NumberStyles.Integer, CultureInfo.InvariantCulture, out var n) ? n : throw new ArgumentException($"{flag} needs an integer.");
            switch (flag)
            {
                case "--model": o.Model = Value(); break;
                case "--served-model-name": o.ServedModelName = Value(); break;
                case "--host": o.Host = Value(); break;
                case "--port": o.Port = Int(); break;
                case "--api-key": o.ApiKey = Value(); break;
                case "--max-num-seqs": o.Engine.MaxNumSeqs = Int(); break;
                case "--stream-interval": o.Engine.StreamInterval = Int(); break;
                case "--speculative-config": o.Engine.Speculative = SpeculativeConfig.Parse(Value()); break;
                case "--max-logprobs": o.Engine.MaxLogprobs = Int(); break;
                case "--chat-template": o.Engine.ChatTemplate = Value(); break;
                case "--generation-config": o.Engine.GenerationConfig = Value(); break;
                case "--scheduling-policy": o.Engine.SchedulingPolicy = Value(); break;
                case "--override-generation-config": o.Engine.OverrideGenerationConfig = JsonNumbers(flag, Value()); break;
                // vLLM needs these to turn tool calls and reasoning on; here both are always on, in the one format each
                // that the chat client parses, so a vLLM command line for Qwen works as it is and any other format is refused.
                case "--enable-auto-tool-choice": break;
                case "--allowed-origins": o.AllowedOrigins = JsonList(flag, Value()); break;
                case "--allowed-methods": o.AllowedMethods = JsonList(flag, Value()); break;
                case "--allowed-headers": o.AllowedHeaders = JsonList(flag, Value()); break;
                case "--allow-credentials": o.AllowCredentials = true; break;
                case "--http2": o.Http2Cleartext = true; break;
                case "--enable-responses-store": o.ResponsesStoreSize = 1000; break;
                case "--enable-lora": o.Engine.EnableLora = true; break;
                case "--max-loras": o.Engine.MaxLoras = Int(); break;
                case "--max-lora-rank": o.Engine.MaxLoraRank = Int(); break;
                case "--max-cpu-loras": o.Engine.MaxCpuLoras = Int(); break;
                case "--lora-modules":
                    // vLLM's forms, one or more after the flag: name=path, or {"name": ..., "path": ...}.
                    do o.LoraModules.Add(LoraModule(Value(), o.LoraModules.Count + 1));
                    while (inline is null && i + 1 < args.Count && !args[i + 1].StartsWith("--", StringComparison.Ordinal));
                    break;
                case "--responses-store-size": o.ResponsesStoreSize = Int(); break;
                case "--ssl-certfile": o.SslCertFile = Value(); break;
                case "--root-path":
                    string root = Value();
                    o.RootPath = root.StartsWith('/') ? root.TrimEnd('/') : throw new ArgumentException($"--root-path '{root}' must start with '/'.");
                    break;
                case "--ssl-keyfile": o.SslKeyFile = Value(); break;
                case "--tool-call-parser":
                    string toolParser = Value();
                    o.ToolCallParser = toolParser is "hermes" or "llama3_json" or "mistral" ? toolParser : throw new ArgumentException(
                        $"--tool-call-parser '{toolParser}' is not supported: tool calls are parsed as hermes (<tool_call>{{...}}</tool_call>, Qwen's), llama3_json ({{\"name\": ..., \"parameters\": ...}}, Llama 3's) or mistral ([TOOL_CALLS][...]), whichever the chat template writes.");
                    break;
                case "--reasoning-parser":
                    if (Value() is not ("qwen3" or "deepseek_r1") and var reasoning)
                        throw new ArgumentException($"--reasoning-parser '{reasoning}' is not supported: reasoning is read from <think>...</think> (qwen3, deepseek_r1).");
                    break;
                case "--max-num-batched-tokens": o.Engine.MaxNumBatchedTokens = Int(); break;
                case "--block-size": o.Engine.BlockSize = Int(); break;
                case "--max-model-len": o.Engine.MaxModelLen = Int(); break;
                case "--kv-cache-memory": o.Engine.KvCacheMemoryBytes = ParseBytes(flag, Value()); break;
                case "--num-gpu-blocks-override": o.Engine.NumKvBlocks = Int(); break;
                case "--max-waiting-requests": o.Engine.MaxWaitingRequests = Int(); break;
                case "--dtype": o.Engine.DType = Value() switch { "auto" or "float" or "float32" => "float32", "bfloat16" or "bf16" => "bfloat16", "float16" or "half" => "float16", var d => d }; break;
                case "--device": o.Engine.Device = Value(); break;
                case "--weight-dtype": o.Engine.WeightDType = Value() switch { "bf16" => "bfloat16", "float" or "fp32" => "float32", var d => d }; break;
                case "--quantization" or "-q": o.Engine.Quantization = Value(); break;
                case "--enable-prefix-caching": o.Engine.EnablePrefixCaching = true; break;
                case "--no-enable-prefix-caching": o.Engine.EnablePrefixCaching = false; break;
                case "--shutdown-timeout": o.ShutdownTimeout = TimeSpan.FromSeconds(Int()); break;
                case "--seed": o.Engine.Seed = Int(); break;
                case "--download-dir": o.Engine.Hub = (o.Engine.Hub ?? new()) with { CacheDir = Value() }; break;
                case "--hf-token": o.Engine.Hub = (o.Engine.Hub ?? new()) with { Token = Value() }; break;
                case "--tensor-parallel-size" or "-tp" or "--pipeline-parallel-size" or "-pp" or "--data-parallel-size" or "-dp":
                    if (Int() != 1)
                        throw new ArgumentException($"{flag} must be 1: a server runs one engine on one device; run several servers behind a load balancer to scale out (README, \"Scaling out\").");
                    break;
                // vLLM command lines often carry these; what they ask for is how this engine always works: chunked prefill
                // is always on, nothing is captured into graphs (eager), and no model code is ever loaded from a repository.
                case "--enable-chunked-prefill" or "--enforce-eager" or "--trust-remote-code": break;
                case "--gpu-memory-utilization":
                    Value();
                    throw new ArgumentException("--gpu-memory-utilization is not served: size the KV cache with --kv-cache-memory (e.g. 8G) or --num-gpu-blocks-override.");
                case "--help" or "-h": throw new ArgumentException("help");
                default: throw new ArgumentException($"Unknown option '{args[i]}'.");
            }
        }
        if (o.ApiKey is null && (environment ?? Environment.GetEnvironmentVariable)("VLLM_API_KEY") is { Length: > 0 } key) o.ApiKey = key;
        if ((environment ?? Environment.GetEnvironmentVariable)("VLLM_ALLOW_RUNTIME_LORA_UPDATING") is { } runtime
            && (runtime.Equals("true", StringComparison.OrdinalIgnoreCase) || runtime == "1"))
            o.AllowRuntimeLoraUpdating = true;
        if (string.IsNullOrWhiteSpace(o.Model)) throw new ArgumentException("--model is required: give a Hugging Face model directory or a hub repository id (owner/name).");
        if (o.Port is < 0 or > 65535) throw new ArgumentException($"--port {o.Port} is not a port.");
        if ((o.SslCertFile is null) != (o.SslKeyFile is null)) throw new ArgumentException("HTTPS needs both --ssl-certfile and --ssl-keyfile.");
        foreach (var (flag, file) in new[] { ("--ssl-certfile", o.SslCertFile), ("--ssl-keyfile", o.SslKeyFile) })
            if (file is not null && !File.Exists(file)) throw new ArgumentException($"{flag}: no such file '{Path.GetFullPath(file)}'.");
        return o;
    }

    /// <summary>A list given as vLLM takes it, a JSON array of strings (<c>'["http://localhost:3000"]'</c>).</summary>
    private static LoraRequest LoraModule(string text, int id)
    {
        if (text.TrimStart().StartsWith('{'))
        {
            var json = JsonNode.Parse(text) as JsonObject;
            if (json?["name"] is JsonValue n && json["path"] is JsonValue p) return new LoraRequest(n.GetValue<string>(), id, p.GetValue<string>());
            throw new ArgumentException($"--lora-modules: '{text}' needs \"name\" and \"path\".");
        }
        int eq = text.IndexOf('=');
        if (eq <= 0 || eq == text.Length - 1) throw new ArgumentException($"--lora-modules: '{text}' is not name=path (or a JSON object with name and path).");
        return new LoraRequest(text[..eq], id, text[(eq + 1)..]);
    }

    private static List<string> JsonList(string flag, string text)
    {
        try
        {
            return System.Text.Json.JsonSerializer.Deserialize<List<string>>(text) ?? throw new System.Text.Json.JsonException();
        }
        catch (System.Text.Json.JsonException)
        {
            throw new ArgumentException($"{flag} needs a JSON list of strings, e.g. '[\"http://localhost:3000\"]'.");
        }
    }

    private static Dictionary<string, double> JsonNumbers(string flag, string text)
    {
        try
        {
            return System.Text.Json.JsonSerializer.Deserialize<Dictionary<string, double>>(text) ?? throw new System.Text.Json.JsonException();
        }
        catch (System.Text.Json.JsonException)
        {
            throw new ArgumentException($"{flag} needs a JSON object of numbers, e.g. '{{\"temperature\": 0.5, \"top_k\": 20}}'.");
        }
    }

    private static long ParseBytes(string flag, string text)
    {
        text = text.Trim();
        long unit = char.ToUpperInvariant(text[^1]) switch { 'K' => 1L << 10, 'M' => 1L << 20, 'G' => 1L << 30, _ => 1 };
        var number = unit == 1 ? text : text[..^1];
        return double.TryParse(number, NumberStyles.Float, CultureInfo.InvariantCulture, out var v) && v > 0
            ? (long)(v * unit)
            : throw new ArgumentException($"{flag} needs a size in bytes, e.g. 2G or 512M.");
    }
}
