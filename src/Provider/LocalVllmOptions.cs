using LocalVllm.Engine;
using LocalVllm.Engine.Loading.Hub;

namespace LocalVllm;

/// <summary>
/// Settings for <c>AddLocalVllm</c>: the model to serve and the engine's knobs. Bindable from configuration (a section
/// with <c>Model</c>, <c>ModelId</c>, <c>PinnedSystemPrompts</c> and <c>Engine:*</c>) and read through
/// <c>IOptions&lt;LocalVllmOptions&gt;</c> (named options for keyed registrations).
/// </summary>
public sealed class LocalVllmOptions
{
    /// <summary>
    /// A Hugging Face model directory (config.json, safetensors, tokenizer files with a chat template) or hub id; in
    /// remote mode (<see cref="Endpoint"/> set), the name of the model the server serves.
    /// </summary>
    public string Model { get; set; } = "";
    /// <summary>
    /// Remote mode: an OpenAI-compatible endpoint (a LocalVllm server or vLLM), e.g. <c>http://host:8000/v1</c>. When set,
    /// no model is loaded here; the chat client sends its requests there.
    /// </summary>
    public Uri? Endpoint { get; set; }
    /// <summary>The API key for <see cref="Endpoint"/>, sent as a bearer token.</summary>
    public string? ApiKey { get; set; }
    /// <summary>The model id reported in responses and matched against <c>ChatOptions.ModelId</c>; defaults to the directory name.</summary>
    public string? ModelId { get; set; }
    /// <summary>
    /// System prompts computed at start-up and pinned (never evicted): each is rendered with the chat template as a
    /// conversation holding only that system message, which is the head of every call that starts with it.
    /// </summary>
    public List<string> PinnedSystemPrompts { get; set; } = [];
    /// <summary>The engine settings; <see cref="EngineOptions.Model"/> is taken from <see cref="Model"/>.</summary>
    public EngineOptions Engine { get; set; } = new();

    /// <summary>Throws an <see cref="InvalidOperationException"/> saying which option is wrong and why.</summary>
    public void Validate()
    {
        if (Endpoint is not null)
        {
            if (!Endpoint.IsAbsoluteUri || Endpoint.Scheme is not ("http" or "https"))
                throw new InvalidOperationException($"LocalVllmOptions.Endpoint '{Endpoint}' is not an absolute http(s) URI such as http://host:8000/v1.");
            if (string.IsNullOrWhiteSpace(Model))
                throw new InvalidOperationException("LocalVllmOptions.Model is not set: in remote mode it names the model the server at Endpoint serves.");
            return;
        }
        if (string.IsNullOrWhiteSpace(Model))
            throw new InvalidOperationException("LocalVllmOptions.Model is not set: give the path of a Hugging Face model directory.");
        if (!Directory.Exists(Model) && ModelResolver.IsRepoId(Model)) return; // resolved from the Hugging Face cache or hub at start
        if (!Directory.Exists(Model))
            throw new InvalidOperationException($"LocalVllmOptions.Model: no such directory '{Path.GetFullPath(Model)}' (and not a hub repository id owner/name).");
        if (!File.Exists(Path.Combine(Model, "config.json")))
            throw new InvalidOperationException($"LocalVllmOptions.Model: '{Path.GetFullPath(Model)}' has no config.json; it is not a Hugging Face model directory.");
    }

    /// <summary>
    /// The engine options with <see cref="EngineOptions.Model"/> set from <see cref="Model"/>: a copy of
    /// <see cref="Engine"/> with every property it has, so nothing set through configuration or code is lost.
    /// </summary>
    /// <summary>
    /// LoRA adapters served beside the model (vLLM's <c>--lora-modules</c>): a call whose <c>ChatOptions.ModelId</c> is an
    /// adapter's name runs under it. Giving any turns <see cref="EngineOptions.EnableLora"/> on.
    /// </summary>
    public List<LoraRequest> LoraModules { get; set; } = [];

    internal EngineOptions ToEngineOptions()
    {
        var e = Engine.Clone();
        e.Model = Model;
        return e;
    }
}
