using LocalVllm.Engine;
using LocalVllm.Engine.Core;
using LocalVllm.Engine.Loading.Hub;
using LocalVllm.Engine.Models;
using LocalVllm.Engine.Text.Templating;

namespace LocalVllm;

/// <summary>An <see cref="AsyncLlmEngine"/> serving one model directory, as the chat client sees it.</summary>
public sealed class LocalVllmEngine : ILocalVllmEngine, IDisposable
{
    /// <summary>
    /// Loads the model, computes and pins <paramref name="pinnedSystemPrompts"/> (each rendered with the chat template
    /// as a conversation holding only that system message), then starts the engine loop.
    /// </summary>
    /// <remarks>
    /// With <paramref name="requireChatTemplate"/> false a base model without a chat template loads too (the server
    /// serves it for completions); a chat request then fails with <see cref="NotSupportedException"/>.
    /// </remarks>
    public LocalVllmEngine(EngineOptions options, string? modelId = null, Microsoft.Extensions.Logging.ILogger? logger = null,
        IEnumerable<string>? pinnedSystemPrompts = null, bool requireChatTemplate = true, IEnumerable<LoraRequest>? loraModules = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        _loraModules = [.. loraModules ?? []];
        _nextLoraId = _loraModules.Select(l => l.Id).DefaultIfEmpty(0).Max() + 1;
        if (LoraModules.Count > 0 && !options.EnableLora)
        {
            options = options.Clone(); // adapters to serve imply LoRA on; the caller's options stay as they are
            options.EnableLora = true;
        }
        var core = new LlmEngine(options, logger);
        try
        {
            if (core.Tokenizer is null)
                throw new InvalidOperationException($"The model directory '{core.Directory.Path}' has no tokenizer files; the chat client needs one.");
            _chatTemplate = core.ChatTemplate;
            if (_chatTemplate is null && requireChatTemplate) throw NoChatTemplate(core);
            ModelId = modelId ?? (ModelResolver.IsRepoId(options.Model) && !Directory.Exists(options.Model)
                ? options.Model.Split('@')[0]
                : Path.GetFileName(core.Directory.Path.TrimEnd(Path.DirectorySeparatorChar)));
            // Pinned here, synchronously, before the loop thread exists: nothing blocks on async code.
            var heads = (pinnedSystemPrompts ?? []).Select(prompt =>
            {
                var request = ChatRequestMapper.Map([new Microsoft.Extensions.AI.ChatMessage(Microsoft.Extensions.AI.ChatRole.System, prompt)], null, ModelId);
                return (IReadOnlyList<int>)EncodeChatPrompt((_chatTemplate ?? throw NoChatTemplate(core)).Render(request.Messages, request.Tools, addGenerationPrompt: false, request.ExtraContext), core);
            }).ToList();
            PinnedSystemPromptIds = core.WarmUp(heads);
            // Each adapter is read once here, so that a bad one fails at start-up, by name (vLLM loads --lora-modules so).
            foreach (var dup in LoraModules.GroupBy(l => l.Name, StringComparer.OrdinalIgnoreCase).Where(g => g.Count() > 1 || string.Equals(g.Key, ModelId, StringComparison.OrdinalIgnoreCase)))
                throw new ArgumentException($"LoRA module name '{dup.Key}' is used twice, or is the base model's own name.", nameof(loraModules));
            foreach (var lora in LoraModules) core.AddLora(lora);
        }
        catch
        {
            core.Dispose();
            throw;
        }
        Engine = new AsyncLlmEngine(core);
    }

    /// <summary>The pin ids of the system prompts pinned at start-up (for <see cref="UnpinAsync"/>).</summary>
    public IReadOnlyList<string> PinnedSystemPromptIds { get; }

    /// <summary>The engine behind this client.</summary>
    public AsyncLlmEngine Engine { get; }
    public string ModelId { get; }
    private readonly ChatTemplate? _chatTemplate;

    /// <inheritdoc />
    public ChatTemplate ChatTemplate => _chatTemplate ?? throw NoChatTemplate(Engine.Engine);

    private static NotSupportedException NoChatTemplate(LlmEngine core) =>
        new($"The model directory '{core.Directory.Path}' has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja): it serves completions, not chat, unless EngineOptions.ChatTemplate (the server's --chat-template) gives it one.");
    /// <summary>
    /// How the chat template has the model write tool calls, by vLLM's parser names: <c>hermes</c> (<c>&lt;tool_call&gt;</c>
    /// blocks), <c>llama3_json</c> (the reply is the call's JSON) or <c>mistral</c> (<c>[TOOL_CALLS]</c> and a JSON array);
    /// null for a model without a chat template.
    /// </summary>
    public string? ToolCallParser => _chatTemplate is null ? null : ToolCallFormats.VllmParser(ToolCallFormats.Of(_chatTemplate.Source));

    public GenerationConfig Defaults => Engine.Engine.SamplingDefaults;
    public int MaxModelLen => Engine.Engine.MaxModelLen;
    public RequestValidator Validator => Engine.Engine.Validator;
    public int[] EncodeChatPrompt(string renderedPrompt) => EncodeChatPrompt(renderedPrompt, Engine.Engine);

    private static int[] EncodeChatPrompt(string renderedPrompt, LlmEngine core) => core.Tokenizer!.Encode(renderedPrompt, addSpecialTokens: false);

    public IAsyncEnumerable<RequestOutput> GenerateAsync(IReadOnlyList<int> promptTokenIds, SamplingParams sampling, string requestId, CancellationToken cancellationToken) =>
        Engine.GenerateAsync(promptTokenIds, sampling, requestId, cancellationToken: cancellationToken);

    /// <inheritdoc />
    public IReadOnlyList<LoraRequest> LoraModules => Volatile.Read(ref _loraModules);

    private LoraRequest[] _loraModules;
    private readonly object _loraGate = new();

    /// <summary>
    /// Serves one more adapter under <paramref name="name"/> from <paramref name="path"/> (vLLM's runtime
    /// <c>load_lora_adapter</c>): read and checked on the engine thread first, so a bad one is refused by name and
    /// nothing changes. Throws <see cref="ArgumentException"/> when the name is taken.
    /// </summary>
    public async Task<LoraRequest> AddLoraModuleAsync(string name, string path)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(name);
        ArgumentException.ThrowIfNullOrWhiteSpace(path);
        if (!Engine.Engine.Options.EnableLora)
            throw new InvalidOperationException("LoRA is off for this engine: start it with EngineOptions.EnableLora (--enable-lora).");
        LoraRequest lora;
        lock (_loraGate)
        {
            if (string.Equals(name, ModelId, StringComparison.OrdinalIgnoreCase) || LoraModules.Any(l => string.Equals(l.Name, name, StringComparison.OrdinalIgnoreCase)))
                throw new ArgumentException($"The LoRA adapter '{name}' is already loaded (or is the base model's name).", nameof(name));
            lora = new LoraRequest(name, _nextLoraId++, path);
        }
        await Engine.InvokeAsync(e => e.AddLora(lora)).ConfigureAwait(false);
        lock (_loraGate)
        {
            if (LoraModules.Any(l => string.Equals(l.Name, name, StringComparison.OrdinalIgnoreCase)))
                throw new ArgumentException($"The LoRA adapter '{name}' was loaded meanwhile by another call.", nameof(name));
            Volatile.Write(ref _loraModules, [.. LoraModules, lora]);
        }
        return lora;
    }

    private int _nextLoraId; // ids are never reused: a dropped adapter's id cannot come back as another adapter

    /// <summary>
    /// Stops serving the adapter <paramref name="name"/> (vLLM's runtime <c>unload_lora_adapter</c>); false when no adapter
    /// has that name. Throws <see cref="InvalidOperationException"/> while requests under it are running.
    /// </summary>
    public async Task<bool> RemoveLoraModuleAsync(string name)
    {
        var lora = LoraModules.FirstOrDefault(l => string.Equals(l.Name, name, StringComparison.OrdinalIgnoreCase));
        if (lora is null) return false;
        await Engine.InvokeAsync(e => e.RemoveLora(lora.Id)).ConfigureAwait(false);
        lock (_loraGate)
        {
            Volatile.Write(ref _loraModules, [.. LoraModules.Where(l => l != lora)]);
        }
        return true;
    }

    /// <inheritdoc />
    public IAsyncEnumerable<RequestOutput> GenerateAsync(IReadOnlyList<int> promptTokenIds, SamplingParams sampling, string requestId, LoraRequest? lora,
        CancellationToken cancellationToken) =>
        Engine.GenerateAsync(promptTokenIds, sampling, requestId, cancellationToken: cancellationToken, lora: lora);

    public async Task<string> PinAsync(IReadOnlyList<int> prefixTokenIds, CancellationToken cancellationToken) =>
        (await Engine.WarmUpAsync([prefixTokenIds], cancellationToken).ConfigureAwait(false))[0];

    public Task<bool> UnpinAsync(string pinId) => Engine.UnpinAsync(pinId);

    /// <inheritdoc />
    public void Dispose() => Engine.Dispose();
}
