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
/// The HTTP server against the same engine in-process, in one run: <c>--clients</c> concurrent streaming requests
/// (random prompts, fixed output length, EOS ignored, greedy) go once straight to the server's <see cref="AsyncLlmEngine"/>
/// and once through <c>POST /v1/completions</c> with <c>stream: true</c> over loopback, alternating, <c>--repeat</c>
/// times. Reported: output tokens per second and time to first token (p50) of each path, the median run of each, and
/// their ratio and difference. The prefix cache is off so that no run reuses another's prompts.
/// </summary>
internal static class ServeBench
{
    public sealed record Settings(string Size, int Clients, int PromptTokens, int OutputTokens, int Repeat, int? Threads, string? Json);

    public sealed record Run(string Path, int Clients, double TokensPerSecond, double TtftP50Ms, double WallSeconds);

    public static int Execute(Settings s)
    {
        TorchRuntime.Configure();
        var model = WithTokenizer(BenchModels.Resolve(s.Size));
        var options = new ServerOptions { Model = model, Port = 0 };
        options.Engine.EnablePrefixCaching = false;
        options.Engine.KvCacheMemoryBytes = 1L << 30;
        options.Engine.NumThreads = s.Threads;
        options.Engine.MaxNumSeqs = Math.Max(128, s.Clients);
        var server = LocalVllmServer.Create(options, logging: b => b.SetMinimumLevelWarning());
        server.StartAsync().GetAwaiter().GetResult();
        try
        {
            using var http = new HttpClient { BaseAddress = server.BaseAddress, Timeout = TimeSpan.FromMinutes(30) };
            var engine = server.Engine.Engine;
            int vocab = engine.Engine.Model.Config.VocabSize;
            var rng = new Random(0);
            int[][] Prompts() => Enumerable.Range(0, s.Clients).Select(_ => Enumerable.Range(0, s.PromptTokens).Select(_ => rng.Next(3, vocab)).ToArray()).ToArray();
            var sampling = new SamplingParams { Temperature = 0, MaxTokens = s.OutputTokens, IgnoreEos = true, OutputKind = RequestOutputKind.Delta };

            // Warm-up: both paths once with a few short requests (JIT, Kestrel, connections).
            InProcess(engine, Prompts().Take(4).ToArray(), sampling with { MaxTokens = 4 }).GetAwaiter().GetResult();
            OverHttp(http, Prompts().Take(4).ToArray(), 4).GetAwaiter().GetResult();

            var runs = new List<Run>();
            for (int r = 0; r < s.Repeat; r++)
            {
                runs.Add(Measure("in-process", s.Clients, () => InProcess(engine, Prompts(), sampling)));
                Interlocked.Exchange(ref s_textEvents, 0);
                runs.Add(Measure("http", s.Clients, () => OverHttp(http, Prompts(), s.OutputTokens)));
                double tokensPerEvent = (double)s.Clients * s.OutputTokens / Math.Max(1, Interlocked.Read(ref s_textEvents));
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
            Console.WriteLine($"{s.Size}, {s.Clients} streaming clients, {s.PromptTokens}-token prompts, {s.OutputTokens} tokens each (median of {s.Repeat}):");
            Console.WriteLine($"  throughput: http {overHttp.TokensPerSecond:F1} tok/s / in-process {inProcess.TokensPerSecond:F1} tok/s = {overHttp.TokensPerSecond / inProcess.TokensPerSecond:P1}");
            Console.WriteLine($"  TTFT p50: http {ttftHttp:F1} ms, in-process {ttftIn:F1} ms, added {ttftHttp - ttftIn:F1} ms");
            if (s.Json is not null)
                File.WriteAllText(s.Json, JsonSerializer.Serialize(new { settings = s, runs, ratio = overHttp.TokensPerSecond / inProcess.TokensPerSecond, addedTtftMs = ttftHttp - ttftIn },
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

    private static Run Measure(string path, int clients, Func<Task<(long Tokens, List<double> TtftMs)>> work)
    {
        var t0 = Stopwatch.GetTimestamp();
        var (tokens, ttft) = work().GetAwaiter().GetResult();
        double wall = Stopwatch.GetElapsedTime(t0).TotalSeconds;
        var sorted = ttft.Order().ToArray();
        return new Run(path, clients, tokens / wall, sorted[sorted.Length / 2], wall);
    }

    private static async Task<(long, List<double>)> InProcess(AsyncLlmEngine engine, int[][] prompts, SamplingParams sampling)
    {
        var ttft = new double[prompts.Length];
        var counts = await Task.WhenAll(prompts.Select(async (p, i) =>
        {
            long start = Stopwatch.GetTimestamp();
            long n = 0;
            await foreach (var o in engine.GenerateAsync(p, sampling))
            {
                if (n == 0) ttft[i] = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                n += o.Outputs[0].TokenIds.Count;
            }
            return n;
        }));
        return (counts.Sum(), ttft.ToList());
    }

    private static long s_textEvents;

    private static async Task<(long, List<double>)> OverHttp(HttpClient http, int[][] prompts, int outputTokens)
    {
        var ttft = new double[prompts.Length];
        var counts = await Task.WhenAll(prompts.Select(async (p, i) =>
        {
            var body = new JsonObject
            {
                ["prompt"] = new JsonArray(p.Select(t => (JsonNode?)t).ToArray()), ["max_tokens"] = outputTokens, ["temperature"] = 0,
                ["ignore_eos"] = true, ["stream"] = true, ["stream_options"] = new JsonObject { ["include_usage"] = true },
            };
            long start = Stopwatch.GetTimestamp();
            using var request = new HttpRequestMessage(HttpMethod.Post, "v1/completions") { Content = new StringContent(body.ToJsonString(), Encoding.UTF8) };
            request.Content.Headers.ContentType = new MediaTypeHeaderValue("application/json");
            using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
            response.EnsureSuccessStatusCode();
            // The client does as little as a client can (it shares these two cores with the server): the first bytes
            // time the first token, the rest is drained in bulk and only the final usage chunk is parsed.
            using var stream = await response.Content.ReadAsStreamAsync();
            var buffer = new byte[64 * 1024];
            int read = await stream.ReadAsync(buffer);
            ttft[i] = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
            using var rest = new MemoryStream();
            rest.Write(buffer, 0, read);
            await stream.CopyToAsync(rest);
            var text = Encoding.UTF8.GetString(rest.GetBuffer(), 0, (int)rest.Length);
            int usage = text.LastIndexOf("\"usage\"", StringComparison.Ordinal);
            int lineStart = text.LastIndexOf("data: ", usage, StringComparison.Ordinal) + 6;
            int lineEnd = text.IndexOf('\n', usage);
            long n = JsonNode.Parse(text[lineStart..lineEnd])!["usage"]!["completion_tokens"]!.GetValue<long>();
            // Events that carried text: all but the usage chunk and [DONE] (the server merges outputs already waiting).
            Interlocked.Add(ref s_textEvents, text.AsSpan().Count("data: ") - 2);
            return n;
        }));
        return (counts.Sum(), ttft.ToList());
    }

    private static void SetMinimumLevelWarning(this Microsoft.Extensions.Logging.ILoggingBuilder b) =>
        b.AddFilter((Func<Microsoft.Extensions.Logging.LogLevel, bool>)(level => level >= Microsoft.Extensions.Logging.LogLevel.Warning));
}
