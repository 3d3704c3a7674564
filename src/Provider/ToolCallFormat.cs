using System.Text.Json;
using Microsoft.Extensions.AI;

namespace LocalVllm;

/// <summary>
/// How a model writes tool calls, read from its chat template: Hermes/Qwen <c>&lt;tool_call&gt;{json}&lt;/tool_call&gt;</c>
/// blocks (vLLM's <c>hermes</c> parser), Llama 3's bare JSON reply <c>{"name": ..., "parameters": {...}}</c> (vLLM's
/// <c>llama3_json</c>), or Mistral's <c>[TOOL_CALLS][{"name": ..., "arguments": {...}}]</c> (vLLM's <c>mistral</c>; the
/// marker is a control token, so the text seen is usually the array alone, and call ids are nine letters or digits,
/// which Mistral's templates check). A template that mentions <c>&lt;tool_call&gt;</c> is Hermes, one that writes
/// <c>[TOOL_CALLS]</c> is Mistral, one with Llama 3's headers and a <c>"parameters"</c> instruction is bare JSON;
/// anything else is taken as Hermes, the format of the reference models.
/// </summary>
internal enum ToolCallFormat
{
    Hermes,
    BareJson,
    Mistral,
}

internal static class ToolCallFormats
{
    public static ToolCallFormat Of(string templateSource) =>
        templateSource.Contains("<tool_call>", StringComparison.Ordinal) ? ToolCallFormat.Hermes
        : templateSource.Contains("[TOOL_CALLS]", StringComparison.Ordinal) ? ToolCallFormat.Mistral
        : templateSource.Contains("<|start_header_id|>", StringComparison.Ordinal) && templateSource.Contains("\"parameters\"", StringComparison.Ordinal) ? ToolCallFormat.BareJson
        : ToolCallFormat.Hermes;

    /// <summary>vLLM's name of the parser for <paramref name="format"/>.</summary>
    public static string VllmParser(ToolCallFormat format) => format switch
    {
        ToolCallFormat.BareJson => "llama3_json",
        ToolCallFormat.Mistral => "mistral",
        _ => "hermes",
    };

    /// <summary>A fresh call id in the form the format's templates accept: nine letters and digits for Mistral's.</summary>
    public static string NewCallId(ToolCallFormat format) =>
        format == ToolCallFormat.Mistral ? Guid.NewGuid().ToString("N")[..9] : $"call_{Guid.NewGuid():N}"[..14];

    /// <summary>Whether a call's replies may hold tool calls: it has tools and does not turn them off.</summary>
    public static bool ToolsOn(ChatOptions? o) => o?.Tools is { Count: > 0 } && o.ToolMode is not NoneChatToolMode;

    /// <summary>The head of one call of <paramref name="name"/> in <paramref name="format"/>, up to its arguments.</summary>
    public static string CallHead(ToolCallFormat format, string name) =>
        "{\"name\": " + JsonSerializer.Serialize(name) + (format == ToolCallFormat.BareJson ? ", \"parameters\": " : ", \"arguments\": ");

    /// <summary>The marker before Mistral's calls, when the tokenizer writes it as text.</summary>
    public const string MistralMarker = "[TOOL_CALLS]";
}
