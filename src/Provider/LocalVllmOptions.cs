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
    /// <summary>A Hugging Face model directory (config.json, safetensors, tokenizer files with a chat template).</summary>
    public string Model { get; set; } = "";
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
    internal EngineOptions ToEngineOptions()
    {
        var e = Engine.Clone();
        e.Model = Model;
        return e;
    }
}
