using LocalVllm.Engine;
using LocalVllm.Engine.Loading.Hub;
using LocalVllm.Engine.Models;
using LocalVllm.Engine.Text.Templating;

namespace LocalVllm;

/// <summary>An <see cref="AsyncLlmEngine"/> serving one model directory, as the chat client sees it.</summary>
public sealed class LocalVllmEngine : ILocalVllmEngine, IDisposable
{
    /// <summary>Loads the model and starts the engine loop.</summary>
    public LocalVllmEngine(EngineOptions options, string? modelId = null, Microsoft.Extensions.Logging.ILogger? logger = null)
    {
        Engine = new AsyncLlmEngine(options, logger);
        var core = Engine.Engine;
        if (core.Tokenizer is null)
            throw new InvalidOperationException($"The model directory '{core.Directory.Path}' has no tokenizer files; the chat client needs one.");
        ChatTemplate = core.ChatTemplate
            ?? throw new InvalidOperationException($"The model directory '{core.Directory.Path}' has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja).");
        ModelId = modelId ?? (ModelResolver.IsRepoId(options.Model) && !Directory.Exists(options.Model)
            ? options.Model.Split('@')[0]
            : Path.GetFileName(core.Directory.Path.TrimEnd(Path.DirectorySeparatorChar)));
    }

    /// <summary>The engine behind this client.</summary>
    public AsyncLlmEngine Engine { get; }
    public string ModelId { get; }
    public ChatTemplate ChatTemplate { get; }
    public GenerationConfig Defaults => Engine.Engine.Directory.Generation;
    public int MaxModelLen => Engine.Engine.MaxModelLen;
    public RequestValidator Validator => Engine.Engine.Validator;
    public int[] EncodeChatPrompt(string renderedPrompt) => Engine.Engine.Tokenizer!.Encode(renderedPrompt, addSpecialTokens: false);

    public IAsyncEnumerable<RequestOutput> GenerateAsync(IReadOnlyList<int> promptTokenIds, SamplingParams sampling, string requestId, CancellationToken cancellationToken) =>
        Engine.GenerateAsync(promptTokenIds, sampling, requestId, cancellationToken: cancellationToken);

    public async Task<string> PinAsync(IReadOnlyList<int> prefixTokenIds, CancellationToken cancellationToken) =>
        (await Engine.WarmUpAsync([prefixTokenIds], cancellationToken).ConfigureAwait(false))[0];

    public Task<bool> UnpinAsync(string pinId) => Engine.UnpinAsync(pinId);

    /// <inheritdoc />
    public void Dispose() => Engine.Dispose();
}
