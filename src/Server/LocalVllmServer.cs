using System.Net;
using LocalVllm.Engine;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OpenTelemetry.Metrics;

namespace LocalVllm.Server;

/// <summary>
/// vLLM's OpenAI-compatible HTTP server over one in-process engine: Kestrel, the engine loaded at creation, the
/// endpoints of <see cref="OpenAiEndpoints"/>. <c>Program</c> runs it; tests start it on a free port.
/// </summary>
public sealed class LocalVllmServer : IAsyncDisposable
{
    private readonly LocalVllmEngine? _engine;

    private LocalVllmServer(WebApplication app, LocalVllmEngine? engine)
    {
        App = app;
        _engine = engine;
    }

    public WebApplication App { get; }
    /// <summary>The engine the server loaded (not there for a server made over a chat-only engine seam).</summary>
    public LocalVllmEngine Engine => _engine ?? throw new InvalidOperationException("This server runs over a chat-only engine seam.");

    /// <summary>Loads the model and builds the server; <see cref="StartAsync"/> (or <c>App.RunAsync</c>) starts listening.</summary>
    public static LocalVllmServer Create(ServerOptions options, Action<ILoggingBuilder>? logging = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        var engineOptions = options.Engine.Clone();
        engineOptions.Model = options.Model;
        // The engine logs through the host's logging; it is created before the app so a bad model fails at once.
        using var bootstrap = LoggerFactory.Create(b => logging?.Invoke(b));
        var engine = new LocalVllmEngine(engineOptions, options.ServedModelName, bootstrap.CreateLogger("LocalVllm.Engine"), requireChatTemplate: false,
            loraModules: options.LoraModules);
        try
        {
            if (options.ToolCallParser is { } parser && engine.ToolCallParser is { } written && parser != written)
                throw new ArgumentException($"--tool-call-parser {parser} does not match the chat template, which has the model write tool calls as {written}.");
            return Build(options, engine, engine, logging);
        }
        catch
        {
            engine.Dispose();
            throw;
        }
    }

    /// <summary>
    /// A server whose chat completions run on <paramref name="chat"/> (the provider's engine seam; tests put scripted
    /// model output there to drive tool calls over HTTP); completions and the tokenizer endpoints answer 501.
    /// </summary>
    internal static LocalVllmServer CreateOverChatEngine(ServerOptions options, ILocalVllmEngine chat) => Build(options, chat, null, null);

    private static LocalVllmServer Build(ServerOptions options, ILocalVllmEngine chat, LocalVllmEngine? engine, Action<ILoggingBuilder>? logging)
    {
        var builder = WebApplication.CreateSlimBuilder();
        if (logging is not null) logging(builder.Logging);
        builder.WebHost.ConfigureKestrel(k =>
        {
            var address = options.Host is "localhost" ? IPAddress.Loopback : IPAddress.Parse(options.Host);
            k.Listen(address, options.Port, listen =>
            {
                if (options.SslCertFile is { } cert)
                {
                    listen.Protocols = Microsoft.AspNetCore.Server.Kestrel.Core.HttpProtocols.Http1AndHttp2;
                    listen.UseHttps(System.Security.Cryptography.X509Certificates.X509Certificate2.CreateFromPemFile(cert, options.SslKeyFile));
                }
                else if (options.Http2Cleartext)
                    listen.Protocols = Microsoft.AspNetCore.Server.Kestrel.Core.HttpProtocols.Http2;
            });
            k.Limits.MaxRequestBodySize = options.MaxRequestBodyBytes;
        });
        builder.Services.AddSingleton(chat);
        // Cross-origin calls from browser pages, with vLLM's defaults (any origin, method and header). The policy runs
        // before the API-key check, so a browser's preflight (which carries no key) gets its answer.
        builder.Services.AddCors(c => c.AddDefaultPolicy(p =>
        {
            if (options.AllowedOrigins.Contains("*"))
            {
                if (options.AllowCredentials) p.SetIsOriginAllowed(_ => true); // "*" with credentials echoes the origin, as Starlette does
                else p.AllowAnyOrigin();
            }
            else p.WithOrigins([.. options.AllowedOrigins]);
            if (options.AllowedMethods.Contains("*")) p.AllowAnyMethod(); else p.WithMethods([.. options.AllowedMethods]);
            if (options.AllowedHeaders.Contains("*")) p.AllowAnyHeader(); else p.WithHeaders([.. options.AllowedHeaders]);
            if (options.AllowCredentials) p.AllowCredentials();
        }));
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = options.ShutdownTimeout);
        // The engine's meter (LocalVllm), exported for Prometheus at /metrics; where vLLM has a metric for the same
        // thing, the series carries vLLM's name.
        builder.Services.AddOpenTelemetry().WithMetrics(m =>
        {
            m.AddMeter("LocalVllm"); // the engine's meter (EngineMetrics)
            foreach (var (ours, vllm) in VllmNames) m.AddView(ours, vllm);
            m.AddPrometheusExporter();
        });
        var app = builder.Build();
        if (options.RootPath is { Length: > 0 } root) app.UsePathBase(root);
        app.UseCors();
        app.MapPrometheusScrapingEndpoint("/metrics");
        new OpenAiEndpoints(chat, engine, options, app.Services.GetRequiredService<ILoggerFactory>().CreateLogger("LocalVllm.Server")).Map(app);
        return new LocalVllmServer(app, engine);
    }

    /// <summary>Our instrument names and vLLM's metric names for the same quantity (the exporter writes ':' as '_').</summary>
    internal static readonly (string Ours, string Vllm)[] VllmNames =
    [
        ("localvllm.requests_running", "vllm:num_requests_running"),
        ("localvllm.requests_waiting", "vllm:num_requests_waiting"),
        ("localvllm.prefill_tokens", "vllm:prompt_tokens"),
        ("localvllm.decode_tokens", "vllm:generation_tokens"),
        ("localvllm.time_to_first_token", "vllm:time_to_first_token_seconds"),
        ("localvllm.time_per_output_token", "vllm:time_per_output_token_seconds"),
        ("localvllm.prefix_cache_hit_rate", "vllm:gpu_prefix_cache_hit_rate"),
        ("localvllm.prefix_cache_query_tokens", "vllm:prefix_cache_queries"),
        ("localvllm.prefix_cache_hit_tokens", "vllm:prefix_cache_hits"),
        ("localvllm.preemptions", "vllm:num_preemptions"),
        ("localvllm.spec_decode_draft_tokens", "vllm:spec_decode_num_draft_tokens"),
        ("localvllm.spec_decode_accepted_tokens", "vllm:spec_decode_num_accepted_tokens"),
        ("localvllm.kv_cache_usage", "vllm:kv_cache_usage_perc"),
        ("localvllm.lora_requests_info", "vllm:lora_requests_info"),
        ("localvllm.requests_finished", "vllm:request_success"),
        ("localvllm.e2e_request_latency", "vllm:e2e_request_latency_seconds"),
        ("localvllm.request_queue_time", "vllm:request_queue_time_seconds"),
        ("localvllm.request_prompt_tokens", "vllm:request_prompt_tokens"),
        ("localvllm.request_generation_tokens", "vllm:request_generation_tokens"),
    ];

    /// <summary>Starts listening; returns once Kestrel is bound.</summary>
    public Task StartAsync(CancellationToken cancellationToken = default) => App.StartAsync(cancellationToken);

    /// <summary>Where the server listens (after <see cref="StartAsync"/>), e.g. http://127.0.0.1:8000/.</summary>
    public Uri BaseAddress => new(App.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First().TrimEnd('/') + "/");

    public async ValueTask DisposeAsync()
    {
        try
        {
            await App.StopAsync().ConfigureAwait(false);
        }
        finally
        {
            await App.DisposeAsync().ConfigureAwait(false);
            _engine?.Dispose();
        }
    }
}
