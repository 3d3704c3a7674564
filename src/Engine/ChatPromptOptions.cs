using System.Text.Json.Nodes;

namespace LocalVllm.Engine;

/// <summary>
/// How a conversation becomes a prompt (vLLM's <c>LLM.chat</c> arguments beyond the messages): the tools the template
/// lists, whether the assistant's turn is opened after the messages or the final message is left open for the model to
/// continue, and extra template variables (<c>chat_template_kwargs</c>, such as Qwen3's <c>enable_thinking</c>).
/// </summary>
public sealed record ChatPromptOptions
{
    /// <summary>Tool definitions (OpenAI's <c>{"type": "function", "function": {...}}</c>) the template renders.</summary>
    public JsonArray? Tools { get; init; }
    /// <summary>Open the assistant's turn after the messages; null: unless <see cref="ContinueFinalMessage"/>.</summary>
    public bool? AddGenerationPrompt { get; init; }
    /// <summary>End the prompt right after the final message's text, so the model continues that message (a prefilled reply).</summary>
    public bool ContinueFinalMessage { get; init; }
    /// <summary>Extra variables for the template (vLLM's <c>chat_template_kwargs</c>).</summary>
    public IReadOnlyDictionary<string, JsonNode?>? ChatTemplateKwargs { get; init; }
}
