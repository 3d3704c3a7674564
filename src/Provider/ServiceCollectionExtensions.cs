using Microsoft.Extensions.AI;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace LocalVllm;

/// <summary>Registers the in-process engine and its <see cref="IChatClient"/>.</summary>
public static class ServiceCollectionExtensions
{
    /// <summary>
    /// Registers the engine (a singleton, disposed with the container) and an <see cref="IChatClient"/> over it; returns
    /// the <see cref="ChatClientBuilder"/> so callers chain <c>.UseFunctionInvocation().UseLogging()</c>. The options
    /// are validated here, at start-up.
    /// </summary>
    public static ChatClientBuilder AddLocalVllm(this IServiceCollection services, Action<LocalVllmOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configure);
        var options = new LocalVllmOptions();
        configure(options);
        options.Validate();
        services.AddSingleton(sp => Start(options, sp));
        services.AddSingleton<ILocalVllmEngine>(sp => sp.GetRequiredService<LocalVllmEngine>());
        return services.AddChatClient(sp => new LocalVllmChatClient(sp.GetRequiredService<ILocalVllmEngine>(), sp.GetService<ILogger<LocalVllmChatClient>>()));
    }

    private static LocalVllmEngine Start(LocalVllmOptions options, IServiceProvider services)
    {
        var logger = services.GetService<ILoggerFactory>()?.CreateLogger("LocalVllm.Engine");
        var engine = new LocalVllmEngine(options.ToEngineOptions(), options.ModelId, logger);
        if (options.PinnedSystemPrompts.Count > 0)
        {
            var client = new LocalVllmChatClient(engine);
            foreach (var prompt in options.PinnedSystemPrompts)
                client.WarmUpAsync([new ChatMessage(ChatRole.System, prompt)]).GetAwaiter().GetResult();
        }
        return engine;
    }

    /// <summary>Registers from a configuration section shaped like <see cref="LocalVllmOptions"/> (Model, ModelId, Engine:...).</summary>
    public static ChatClientBuilder AddLocalVllm(this IServiceCollection services, IConfiguration configuration)
    {
        ArgumentNullException.ThrowIfNull(configuration);
        return services.AddLocalVllm(o => configuration.Bind(o));
    }

    /// <summary>Registers a second (or further) model under <paramref name="key"/>, e.g. two models in one app.</summary>
    public static ChatClientBuilder AddKeyedLocalVllm(this IServiceCollection services, object key, Action<LocalVllmOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(services);
        ArgumentNullException.ThrowIfNull(configure);
        var options = new LocalVllmOptions();
        configure(options);
        options.Validate();
        services.AddKeyedSingleton(key, (sp, _) => Start(options, sp));
        return services.AddKeyedChatClient(key, sp => new LocalVllmChatClient(sp.GetRequiredKeyedService<LocalVllmEngine>(key), sp.GetService<ILogger<LocalVllmChatClient>>()));
    }
}
