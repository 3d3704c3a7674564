using System.Text.Json;
using System.Text.Json.Nodes;

namespace LocalVllm.Engine.Loading;

/// <summary>Reads the JSON files of a model directory; a file that is not a JSON object is an error naming it.</summary>
internal static class JsonFiles
{
    /// <summary>The JSON object in <paramref name="path"/>; throws <see cref="InvalidDataException"/> naming the file otherwise.</summary>
    public static JsonObject ReadObject(string path)
    {
        try
        {
            return JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                ?? throw new InvalidDataException($"'{path}' is not a JSON object.");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"'{path}' is not valid JSON: {e.Message}", e);
        }
    }
}
