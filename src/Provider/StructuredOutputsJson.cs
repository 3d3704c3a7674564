using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;

namespace LocalVllm;

/// <summary>
/// vLLM's request fields for constrained decoding, read into <see cref="StructuredOutputs"/>: the object
/// <c>structured_outputs</c> (<c>json</c>, <c>regex</c>, <c>choice</c>, <c>grammar</c>, <c>json_object</c>,
/// <c>disable_any_whitespace</c>) and the older top-level <c>guided_json</c>, <c>guided_regex</c>,
/// <c>guided_choice</c>, <c>guided_grammar</c>. Used by the server and by <c>ChatOptions.AdditionalProperties</c>.
/// </summary>
public static class StructuredOutputsJson
{
    /// <summary>The older top-level field names that vLLM still reads.</summary>
    public static readonly string[] GuidedFields = ["guided_json", "guided_regex", "guided_choice", "guided_grammar"];

    /// <summary>A <c>structured_outputs</c> object as a constraint; an <see cref="ArgumentException"/> names a malformed field.</summary>
    public static StructuredOutputs Parse(JsonNode? node)
    {
        if (node is not JsonObject o) throw new ArgumentException("structured_outputs must be an object with one of json, regex, choice, grammar or json_object.");
        StructuredOutputs c = new();
        foreach (var (key, value) in o)
        {
            c = key switch
            {
                "json" => c with { Json = value is JsonValue s && s.GetValueKind() == JsonValueKind.String ? s.GetValue<string>() : value?.ToJsonString() },
                "regex" => c with { Regex = Text(value, key) },
                "choice" => c with { Choice = value is JsonArray a ? a.Select(x => Text(x, key)).ToArray() : throw new ArgumentException("structured_outputs.choice must be an array of strings.") },
                "grammar" => c with { Grammar = Text(value, key) },
                "json_object" => c with { JsonObject = value?.GetValue<bool>() ?? false },
                "disable_any_whitespace" => c with { Whitespace = value?.GetValue<bool>() == false ? JsonWhitespace.Flexible : JsonWhitespace.Compact },
                "whitespace_pattern" or "disable_additional_properties" or "disable_fallback" or "structural_tag" or "backend" =>
                    throw new ArgumentException($"structured_outputs.{key} is not supported."),
                _ => throw new ArgumentException($"structured_outputs.{key} is not a known field; use json, regex, choice, grammar or json_object."),
            };
        }
        _ = c.Kind; // exactly one
        return c;
    }

    /// <summary>A constraint from the older <c>guided_*</c> fields of <paramref name="body"/>, or null when none is set.</summary>
    public static StructuredOutputs? FromGuidedFields(JsonObject body)
    {
        var o = new JsonObject();
        foreach (var f in GuidedFields)
            if (body[f] is { } v) o[f["guided_".Length..]] = v.DeepClone();
        return o.Count == 0 ? null : Parse(o);
    }

    private static string Text(JsonNode? v, string key) =>
        v is JsonValue s && s.GetValueKind() == JsonValueKind.String ? s.GetValue<string>() : throw new ArgumentException($"structured_outputs.{key} must be a string.");
}
