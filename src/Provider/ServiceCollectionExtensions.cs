using Microsoft.Extensions.AI;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace LocalVllm;

/// <summary>Registers the in-process engine and its <see cref="IChatClient"/>.</summary>
public static class ServiceCollectionExtensions
{
    /// <summary>
    /// Registers the engine (a singleton, loaded on first resolve and disposed with the container) and an
    /// <see cref="IChatClient"/> over it; returns the <see cref="ChatClientBuilder"/> so callers chain
    /// <c>.UseFunctionInvocation().UseLogging()</c>. <paramref name="configure"/> is added to
    /// <c>IOptions&lt;LocalVllmOptions&gt;</c>, and the options it makes are validated here, at registration.
    /// </summary>
    public static ChatClientBuilder AddLocalVllm(this IServiceCollection services, Action<LocalVllmOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configure);
        ValidateNow(configure);
        services.AddOptions<LocalVllmOptions>().Configure(configure);
        return services.AddLocalVllm();
    }

    /// <summary>
    /// Registers the engine and its <see cref="IChatClient"/> with the options configured elsewhere through
    /// <c>IOptions&lt;LocalVllmOptions&gt;</c> (<c>services.Configure&lt;LocalVllmOptions&gt;(...)</c>); they are
    /// validated when the engine is first resolved.
    /// </summary>
    public static ChatClientBuilder AddLocalVllm(this IServiceCollection services)
    {
        ArgumentNullException.ThrowIfNull(services);
        services.AddOptions<LocalVllmOptions>();
        services.TryAddSingleton(sp => Start(sp.GetRequiredService<IOptions<LocalVllmOptions>>().Value, sp));
        services.TryAddSingleton<ILocalVllmEngine>(sp => sp.GetRequiredService<LocalVllmEngine>());
        return services.AddChatClient(sp => Client(sp.GetRequiredService<IOptions<LocalVllmOptions>>().Value, sp, () => sp.GetRequiredService<ILocalVllmEngine>()));
    }

    /// <summary>Registers from a configuration section shaped like <see cref="LocalVllmOptions"/> (Model, ModelId, PinnedSystemPrompts, Engine:...).</summary>
    public static ChatClientBuilder AddLocalVllm(this IServiceCollection services, IConfiguration configuration)
    {
        ArgumentNullException.ThrowIfNull(configuration);
        return services.AddLocalVllm(o => configuration.Bind(o));
    }

    /// <summary>
    /// Registers a second (or further) model under <paramref name="key"/>, e.g. two models in one app. Its options are
    /// the named options <c>key.ToString()</c> of <c>IOptionsMonitor&lt;LocalVllmOptions&gt;</c>.
    /// </summary>
    public static ChatClientBuilder AddKeyedLocalVllm(this IServiceCollection services, object key, Action<LocalVllmOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(key);
        ArgumentNullException.ThrowIfNull(configure);
        ValidateNow(configure);
        string name = OptionsName(key);
        services.AddOptions<LocalVllmOptions>(name).Configure(configure);
        services.AddKeyedSingleton(key, (sp, _) => Start(sp.GetRequiredService<IOptionsMonitor<LocalVllmOptions>>().Get(name), sp));
        return services.AddKeyedChatClient(key, sp => Client(sp.GetRequiredService<IOptionsMonitor<LocalVllmOptions>>().Get(name), sp,
            () => sp.GetRequiredKeyedService<LocalVllmEngine>(key)));
    }

    /// <summary>
    /// Registers an <see cref="IEmbeddingGenerator{TInput, TEmbedding}"/> of the same registration (call after
    /// <c>AddLocalVllm</c>): in-process, <see cref="LocalVllmEmbeddingGenerator"/> over the shared engine; remote
    /// (<see cref="LocalVllmOptions.Endpoint"/>), Microsoft.Extensions.AI.OpenAI's generator against the server's
    /// <c>/v1/embeddings</c>. Configuration decides, as for the chat client.
    /// </summary>
    public static EmbeddingGeneratorBuilder<string, Embedding<float>> AddLocalVllmEmbeddingGenerator(this IServiceCollection services)
    {
        ArgumentNullException.ThrowIfNull(services);
        return services.AddEmbeddingGenerator(sp =>
        {
            var options = sp.GetRequiredService<IOptions<LocalVllmOptions>>().Value;
            if (options.Endpoint is null) return new LocalVllmEmbeddingGenerator(sp.GetRequiredService<LocalVllmEngine>());
            options.Validate();
            return new OpenAI.OpenAIClient(new System.ClientModel.ApiKeyCredential(options.ApiKey ?? "none"), new OpenAI.OpenAIClientOptions { Endpoint = options.Endpoint })
                .GetEmbeddingClient(options.Model).AsIEmbeddingGenerator();
        });
    }

    /// <summary>The options name a keyed registration reads.</summary>
    public static string OptionsName(object key) => key.ToString() ?? throw new ArgumentException("The service key's ToString() is null.", nameof(key));

    private static void ValidateNow(Action<LocalVllmOptions> configure)
    {
        var probe = new LocalVllmOptions();
        configure(probe);
        probe.Validate();
    }

    /// <summary>In-process (the engine, loaded on first use) or remote (<see cref="LocalVllmOptions.Endpoint"/>): configuration decides.</summary>
    private static IChatClient Client(LocalVllmOptions options, IServiceProvider services, Func<ILocalVllmEngine> engine)
    {
        if (options.Endpoint is not null)
        {
            options.Validate();
            return new RemoteChatClient(options.Endpoint, options.Model, options.ApiKey);
        }
        return new LocalVllmChatClient(engine(), services.GetService<ILogger<LocalVllmChatClient>>());
    }

    private static LocalVllmEngine Start(LocalVllmOptions options, IServiceProvider services)
    {
        options.Validate();
        var logger = services.GetService<ILoggerFactory>()?.CreateLogger("LocalVllm.Engine");
        return new LocalVllmEngine(options.ToEngineOptions(), options.ModelId, logger, options.PinnedSystemPrompts, loraModules: options.LoraModules);
    }
}
