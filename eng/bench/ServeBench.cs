using System.Diagnostics;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using LocalVllm.Engine.Kernels.Cpu;
using LocalVllm.Server;
using Microsoft.Extensions.Logging;

namespace LocalVllm.Bench;

/// <summary>
/// The HTTP server against the same engine in-process, in one run: <c>--clients</c> concurrent streaming clients, each
/// sending <c>--waves</c> requests one after another (random prompts, fixed output length, EOS ignored, greedy), go
/// once straight to the server's <see cref="AsyncLlmEngine"/> and once through <c>POST /v1/completions</c> with
/// <c>stream: true</c> over loopback, <c>--repeat</c> rounds after two warm-up rounds, the paths taking turns going
/// first. Reported: output tokens per second and time to first token (p50) of each path, the median run of each, their
/// ratio and difference, the ratio within each round and its median, and CPU time per 1,000 tokens by thread group.
/// The prefix cache is off so that no run reuses another's prompts.
/// </summary>
internal static class ServeBench
{
    public sealed record Settings(string Size, int Clients, int PromptTokens, int OutputTokens, int Repeat, int Waves, int StreamInterval, bool CpuByThread, string Api, int? Threads, string? Json,
        bool Http2 = false, bool Floor = false, string Client = "httpclient");

    public sealed record Run(string Path, int Clients, double TokensPerSecond, double TtftP50Ms, double WallSeconds, long Tokens, Dictionary<string, double> CpuMs);

    public static int Execute(Settings s)
    {
        TorchRuntime.Configure();
        var model = WithTokenizer(BenchModels.Resolve(s.Size));
        var options = new ServerOptions { Model = model, Port = 0, Http2Cleartext = s.Http2 };
        options.Engine.EnablePrefixCaching = false;
        options.Engine.KvCacheMemoryBytes = 1L << 30;
        options.Engine.NumThreads = s.Threads;
        options.Engine.MaxNumSeqs = Math.Max(128, s.Clients);
        options.Engine.StreamInterval = s.StreamInterval;
        // The chat form needs a chat template: stories260K has none, and TinyLlama's fits its tokenizer (same special tokens).
        if (s.Api == "chat" && s.Size == "stories")
            options.Engine.ChatTemplate = Path.Combine(BenchModels.FindShared("fixtures/tokenizers/chat_templates"), "TinyLlama-TinyLlama-1.1B-Chat-v1.0.jinja");
        var server = LocalVllmServer.Create(options, logging: b => b.SetMinimumLevelWarning());
        server.StartAsync().GetAwaiter().GetResult();
        try
        {
            // HTTP/2 (--http2): every client's stream on one connection, as a multiplexing proxy or client sends them.
            using var http = s.Http2
                ? new HttpClient(new SocketsHttpHandler { EnableMultipleHttp2Connections = false })
                {
                    BaseAddress = server.BaseAddress, Timeout = TimeSpan.FromMinutes(30),
                    DefaultRequestVersion = System.Net.HttpVersion.Version20, DefaultVersionPolicy = HttpVersionPolicy.RequestVersionExact,
                }
                : new HttpClient { BaseAddress = server.BaseAddress, Timeout = TimeSpan.FromMinutes(30) };
            if (s.Client is not ("httpclient" or "polled")) throw new ArgumentException($"--client is httpclient or polled, not '{s.Client}'.");
            if (s.Client == "polled" && (s.Http2 || s.Api != "completions")) throw new ArgumentException("--client polled speaks HTTP/1.1 to /v1/completions only.");
            var engine = server.Engine.Engine;
            int vocab = engine.Engine.Model.Config.VocabSize;
            var rng = new Random(0);
            int[][] Prompts() => Enumerable.Range(0, s.Clients * s.Waves).Select(_ => Enumerable.Range(0, s.PromptTokens).Select(_ => rng.Next(3, vocab)).ToArray()).ToArray();
            var sampling = new SamplingParams { Temperature = 0, MaxTokens = s.OutputTokens, IgnoreEos = true, OutputKind = RequestOutputKind.Delta };
            Func<Task<(long, List<double>)>> inProcessRun, httpRun;
            if (s.Api == "chat")
            {
                // The same prompts as text (their tokens decoded), through the chat client in-process and
                // /v1/chat/completions over HTTP: both render the chat template, so both send the same token ids.
                var tokenizer = engine.Engine.Tokenizer!;
                var chatClient = new LocalVllm.LocalVllmChatClient(server.Engine);
                var chatOptions = new Microsoft.Extensions.AI.ChatOptions
                {
                    Temperature = 0, MaxOutputTokens = s.OutputTokens, AdditionalProperties = new() { ["ignore_eos"] = true },
                };
                string[] Texts() => Prompts().Select(p => tokenizer.Decode(p)).ToArray();
                inProcessRun = () => ChatInProcess(chatClient, Texts(), chatOptions, s.Waves);
                httpRun = () => ChatOverHttp(http, Texts(), s.OutputTokens, s.Waves);
            }
            else
            {
                inProcessRun = () => InProcess(engine, Prompts(), sampling, s.Waves);
                httpRun = s.Client == "polled"
                    ? () => Polled(new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, server.BaseAddress.Port), Prompts(), s.OutputTokens, s.Waves)
                    : () => OverHttp(http, Prompts(), s.OutputTokens, s.Waves);
            }

            // Warm-up: two full rounds of each path, not counted (JIT and tiering, Kestrel, connections, the engine's
            // buffers at this batch size: the first rounds ran up to 2x slower than the later ones).
            for (int w = 0; w < 2; w++)
            {
                inProcessRun().GetAwaiter().GetResult();
                httpRun().GetAwaiter().GetResult();
            }

            Interlocked.Exchange(ref s_allTextEvents, 0); // the measured rounds' events and bytes only
            Interlocked.Exchange(ref s_allBytes, 0);
            var runs = new List<Run>();
            for (int r = 0; r < s.Repeat; r++)
            {
                // The paths take turns going first (ABBA), so that a host getting faster or slower favours neither.
                Run? a = null, b = null;
                if (r % 2 == 1) a = Measure("in-process", s.Clients, inProcessRun, s.CpuByThread);
                Interlocked.Exchange(ref s_textEvents, 0);
                b = Measure("http", s.Clients, httpRun, s.CpuByThread);
                long textEvents = Interlocked.Read(ref s_textEvents);
                a ??= Measure("in-process", s.Clients, inProcessRun, s.CpuByThread);
                runs.Add(a);
                runs.Add(b);
                double tokensPerEvent = (double)s.Clients * s.Waves * s.OutputTokens / Math.Max(1, textEvents);
                Console.WriteLine($"  round {r + 1}: in-process {runs[^2].TokensPerSecond:F1} tok/s (TTFT p50 {runs[^2].TtftP50Ms:F1} ms), " +
                                  $"http {runs[^1].TokensPerSecond:F1} tok/s (TTFT p50 {runs[^1].TtftP50Ms:F1} ms, {tokensPerEvent:F2} tokens per event)");
            }
            Run Median(string path)
            {
                var list = runs.Where(x => x.Path == path).OrderBy(x => x.TokensPerSecond).ToList();
                return list[list.Count / 2];
            }
            var inProcess = Median("in-process");
            var overHttp = Median("http");
            double ttftIn = runs.Where(x => x.Path == "in-process").Select(x => x.TtftP50Ms).Order().ElementAt(s.Repeat / 2);
            double ttftHttp = runs.Where(x => x.Path == "http").Select(x => x.TtftP50Ms).Order().ElementAt(s.Repeat / 2);
            Console.WriteLine($"{s.Size}, {s.Clients} streaming clients x {s.Waves} requests, {s.PromptTokens}-token prompts, {s.OutputTokens} tokens each, stream interval {s.StreamInterval} (median of {s.Repeat}):");
            // The ratio within each round (its two runs are next to each other in time, so a host that slows down or
            // speeds up between rounds moves both), and their median: steadier than the ratio of the two medians.
            var roundRatios = Enumerable.Range(0, s.Repeat).Select(r => runs[2 * r + 1].TokensPerSecond / runs[2 * r].TokensPerSecond).ToList();
            double ratioMedian = roundRatios.Order().ElementAt(s.Repeat / 2);
            Console.WriteLine($"  throughput: http {overHttp.TokensPerSecond:F1} tok/s / in-process {inProcess.TokensPerSecond:F1} tok/s = {overHttp.TokensPerSecond / inProcess.TokensPerSecond:P1}");
            Console.WriteLine($"  ratio by round: {string.Join(", ", roundRatios.Select(x => x.ToString("P1")))}; median {ratioMedian:P1}");
            // CPU time per 1,000 tokens by thread group over all rounds of a path: where the HTTP path's extra work goes.
            // (It moves with the host's speed as the wall clock does; the engine's threads poll, so their share fills
            // whatever the other threads leave.)
            foreach (var path in new[] { "in-process", "http" })
            {
                var mine = runs.Where(x => x.Path == path).ToList();
                double k = mine.Sum(x => x.Tokens) / 1000.0;
                var perK = mine.SelectMany(x => x.CpuMs).GroupBy(g => g.Key).ToDictionary(g => g.Key, g => g.Sum(x => x.Value) / k);
                Console.WriteLine($"  CPU per 1,000 tokens, {path}: {perK.Values.Sum():F1} ms ({ThreadCpu.Format(perK.Where(g => g.Value >= 0.5).ToDictionary(), "ms")})");
            }
            Console.WriteLine($"  TTFT p50: http {ttftHttp:F1} ms, in-process {ttftIn:F1} ms, added {ttftHttp - ttftIn:F1} ms");
            object? floor = null;
            if (s.Floor)
            {
                // What the network alone costs per event on this host, against the core time a token takes in-process:
                // about the most any server can keep on these cores, whatever it does above a send. Not a strict cap:
                // the engine's CPU workers spin between parallel loops, and work can hide in that spin.
                long events = Interlocked.Read(ref s_allTextEvents), bytes = Interlocked.Read(ref s_allBytes);
                double tokensPerEvent = (double)runs.Where(x => x.Path == "http").Sum(x => x.Tokens) / Math.Max(1, events);
                int eventBytes = (int)(bytes / Math.Max(1, events));
                var f = LoopbackFloor.Measure(s.Http2 ? 1 : s.Clients, 2000, eventBytes);
                double coreUs = Environment.ProcessorCount * 1e6 / inProcess.TokensPerSecond;
                double Bound(double us) => coreUs / (coreUs + us / tokensPerEvent);
                Console.WriteLine($"  loopback floor per event ({(s.Http2 ? 1 : s.Clients)} connections, {eventBytes} bytes, no HTTP): send alone {f.SendOnlyUs:F1} us, " +
                                  $"send + one polling receiver {f.SendAndPolledReceiveUs:F1} us, send + thread-pool receives {f.SendAndAsyncReceiveUs:F1} us");
                Console.WriteLine($"  core time per token in-process (median run, {Environment.ProcessorCount} cores): {coreUs:F1} us; at {tokensPerEvent:F2} tokens per event " +
                                  $"adding only the floor's CPU to each token would leave HTTP / in-process at {Bound(f.SendOnlyUs):P1} (client elsewhere), " +
                                  $"{Bound(f.SendAndPolledReceiveUs):P1} (polling client here), {Bound(f.SendAndAsyncReceiveUs):P1} (thread-pool client here)");
                floor = new { eventBytes, tokensPerEvent, coreUsPerToken = coreUs, f.SendOnlyUs, f.SendAndPolledReceiveUs, f.SendAndAsyncReceiveUs,
                    boundSendOnly = Bound(f.SendOnlyUs), boundPolled = Bound(f.SendAndPolledReceiveUs), boundAsync = Bound(f.SendAndAsyncReceiveUs) };
            }
            if (s.Json is not null)
                File.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, runs, ratio = overHttp.TokensPerSecond / inProcess.TokensPerSecond, roundRatios, ratioMedian, addedTtftMs = ttftHttp - ttftIn, floor },
                    new JsonSerializerOptions { WriteIndented = true }));
            return 0;
        }
        finally
        {
            server.DisposeAsync().AsTask().GetAwaiter().GetResult();
        }
    }

    /// <summary>
    /// The server needs a tokenizer; the random Qwen3-0.6B-shaped model has none, so it is served from a folder of links
    /// to its files plus the real Qwen3 tokenizer of the shared fixtures (same vocabulary size), leaving the model's own
    /// folder (which other benchmarks read without a tokenizer) as it is.
    /// </summary>
    internal static string WithTokenizer(string dir)
    {
        if (File.Exists(Path.Combine(dir, "tokenizer.json")) || File.Exists(Path.Combine(dir, "tokenizer.model"))) return dir;
        var target = dir.TrimEnd('/') + "-with-qwen3-tokenizer";
        if (!File.Exists(Path.Combine(target, "tokenizer.json")))
        {
            Directory.CreateDirectory(target);
            foreach (var f in Directory.GetFiles(dir))
            {
                var link = Path.Combine(target, Path.GetFileName(f));
                if (!File.Exists(link)) File.CreateSymbolicLink(link, f);
            }
            var tokenizer = BenchModels.FindShared("fixtures/tiny-qwen3-chat");
            foreach (var name in new[] { "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt" })
                File.Copy(Path.Combine(tokenizer, name), Path.Combine(target, name), overwrite: true);
        }
        return target;
    }

    private static Run Measure(string path, int clients, Func<Task<(long Tokens, List<double> TtftMs)>> work, bool printCpu)
    {
        var cpu0 = ThreadCpu.Snapshot();
        var t0 = Stopwatch.GetTimestamp();
        var (tokens, ttft) = work().GetAwaiter().GetResult();
        double wall = Stopwatch.GetElapsedTime(t0).TotalSeconds;
        var cpu = ThreadCpu.Difference(cpu0, ThreadCpu.Snapshot());
        if (printCpu) Console.WriteLine($"    {path} {wall * 1000:F0} ms wall: {ThreadCpu.Format(cpu)}");
        var sorted = ttft.Order().ToArray();
        return new Run(path, clients, tokens / wall, sorted[sorted.Length / 2], wall, tokens, cpu);
    }

    /// <summary>Client c sends prompts c*waves .. c*waves+waves-1 one after another; returns the tokens and every request's time to first token.</summary>
    private static async Task<(long, List<double>)> Clients<T>(T[] prompts, int waves, Func<T, Task<(long Tokens, double TtftMs)>> request)
    {
        var results = await Task.WhenAll(Enumerable.Range(0, prompts.Length / waves).Select(async c =>
        {
            var mine = new List<(long Tokens, double TtftMs)>();
            for (int w = 0; w < waves; w++) mine.Add(await request(prompts[c * waves + w]));
            return mine;
        }));
        var all = results.SelectMany(r => r).ToList();
        return (all.Sum(r => r.Tokens), all.Select(r => r.TtftMs).ToList());
    }

    private static Task<(long, List<double>)> InProcess(AsyncLlmEngine engine, int[][] prompts, SamplingParams sampling, int waves) =>
        Clients(prompts, waves, async p =>
        {
            long start = Stopwatch.GetTimestamp();
            long n = 0;
            double ttft = 0;
            await foreach (var o in engine.GenerateAsync(p, sampling))
            {
                if (n == 0) ttft = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                n += o.Outputs[0].TokenIds.Count;
            }
            return (n, ttft);
        });

    /// <summary>In-process chat: the chat client's streaming updates; tokens counted from the final usage.</summary>
    private static Task<(long, List<double>)> ChatInProcess(LocalVllm.LocalVllmChatClient client, string[] prompts, Microsoft.Extensions.AI.ChatOptions options, int waves) =>
        Clients(prompts, waves, async text =>
        {
            long start = Stopwatch.GetTimestamp();
            double ttft = 0;
            long tokens = 0;
            bool first = true;
            await foreach (var u in client.GetStreamingResponseAsync([new Microsoft.Extensions.AI.ChatMessage(Microsoft.Extensions.AI.ChatRole.User, text)], options))
            {
                if (first && u.Text.Length > 0) { ttft = Stopwatch.GetElapsedTime(start).TotalMilliseconds; first = false; }
                foreach (var usage in u.Contents.OfType<Microsoft.Extensions.AI.UsageContent>()) tokens = usage.Details.OutputTokenCount ?? 0;
            }
            return (tokens, ttft);
        });

    /// <summary>Chat over HTTP: streamed /v1/chat/completions, drained in bulk like the completions client; usage from the last chunk.</summary>
    private static Task<(long, List<double>)> ChatOverHttp(HttpClient http, string[] prompts, int outputTokens, int waves) =>
        Clients(prompts, waves, async text =>
        {
            var body = new JsonObject
            {
                ["messages"] = new JsonArray(new JsonObject { ["role"] = "user", ["content"] = text }), ["max_tokens"] = outputTokens, ["temperature"] = 0,
                ["ignore_eos"] = true, ["stream"] = true, ["stream_options"] = new JsonObject { ["include_usage"] = true },
            };
            return await StreamOverHttp(http, "v1/chat/completions", body);
        });

    /// <summary>Posts a streaming request: the first bytes time the first token, the rest is drained in bulk and only the usage chunk parsed.</summary>
    private static async Task<(long Tokens, double TtftMs)> StreamOverHttp(HttpClient http, string path, JsonObject body)
    {
        long start = Stopwatch.GetTimestamp();
        using var request = new HttpRequestMessage(HttpMethod.Post, path)
        {
            Content = new StringContent(body.ToJsonString(), Encoding.UTF8), Version = http.DefaultRequestVersion, VersionPolicy = http.DefaultVersionPolicy,
        };
        request.Content.Headers.ContentType = new MediaTypeHeaderValue("application/json");
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        if (!response.IsSuccessStatusCode)
            throw new HttpRequestException($"{(int)response.StatusCode} from {path}: {await response.Content.ReadAsStringAsync()}");
        using var stream = await response.Content.ReadAsStreamAsync();
        var buffer = new byte[64 * 1024];
        int read = await stream.ReadAsync(buffer);
        double ttft = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        using var rest = new MemoryStream();
        rest.Write(buffer, 0, read);
        await stream.CopyToAsync(rest);
        var (n, textEvents) = ReadEvents(Encoding.UTF8.GetString(rest.GetBuffer(), 0, (int)rest.Length), path);
        Interlocked.Add(ref s_textEvents, textEvents);
        Interlocked.Add(ref s_allTextEvents, textEvents);
        Interlocked.Add(ref s_allBytes, rest.Length);
        return (n, ttft);
    }

    private static long s_textEvents, s_allTextEvents, s_allBytes;

    /// <summary>A whole event stream's completion tokens (from its usage chunk) and the events that carried text: all but the usage chunk and [DONE] (and, for chat, the role chunk).</summary>
    internal static (long Tokens, int TextEvents) ReadEvents(string text, string path)
    {
        int usage = text.LastIndexOf("\"usage\"", StringComparison.Ordinal);
        int lineStart = text.LastIndexOf("data: ", usage, StringComparison.Ordinal) + 6;
        int lineEnd = text.IndexOf('\n', usage);
        long tokens = JsonNode.Parse(text[lineStart..lineEnd])!["usage"]!["completion_tokens"]!.GetValue<long>();
        return (tokens, text.AsSpan().Count("data: ") - (path.Contains("chat") ? 3 : 2));
    }

    private static Task<(long, List<double>)> OverHttp(HttpClient http, int[][] prompts, int outputTokens, int waves) =>
        Clients(prompts, waves, p => StreamOverHttp(http, "v1/completions", new JsonObject
        {
            ["prompt"] = new JsonArray(p.Select(t => (JsonNode?)t).ToArray()), ["max_tokens"] = outputTokens, ["temperature"] = 0,
            ["ignore_eos"] = true, ["stream"] = true, ["stream_options"] = new JsonObject { ["include_usage"] = true },
        }));

    /// <summary>The same requests from <see cref="PolledHttpClients"/>: one thread polling every connection.</summary>
    private static Task<(long, List<double>)> Polled(System.Net.IPEndPoint server, int[][] prompts, int outputTokens, int waves) =>
        Task.Factory.StartNew(() =>
        {
            var bodies = prompts.Select(p => new JsonObject
            {
                ["prompt"] = new JsonArray(p.Select(t => (JsonNode?)t).ToArray()), ["max_tokens"] = outputTokens, ["temperature"] = 0,
                ["ignore_eos"] = true, ["stream"] = true, ["stream_options"] = new JsonObject { ["include_usage"] = true },
            }.ToJsonString()).ToList();
            var (tokens, ttft, textEvents, bytes) = PolledHttpClients.Run(server, "v1/completions", bodies, waves);
            Interlocked.Add(ref s_textEvents, textEvents);
            Interlocked.Add(ref s_allTextEvents, textEvents);
            Interlocked.Add(ref s_allBytes, bytes);
            return (tokens, ttft);
        }, TaskCreationOptions.LongRunning);

    private static void SetMinimumLevelWarning(this Microsoft.Extensions.Logging.ILoggingBuilder b) =>
        b.AddFilter((Func<Microsoft.Extensions.Logging.LogLevel, bool>)(level => level >= Microsoft.Extensions.Logging.LogLevel.Warning));
}
