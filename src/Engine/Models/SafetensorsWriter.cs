using System.Text;
using System.Text.Json.Nodes;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Models;

/// <summary>Writes tensors as a safetensors file (used to save generated demo and benchmark models).</summary>
public static class SafetensorsWriter
{
    /// <summary>Writes <paramref name="tensors"/> (CPU, F32/BF16/F16) to <paramref name="path"/> in key order.</summary>
    public static void Write(string path, IReadOnlyDictionary<string, Tensor> tensors)
    {
        var header = new JsonObject();
        long offset = 0;
        var ordered = tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal).ToArray();
        foreach (var (name, t) in ordered)
        {
            long size = t.NumberOfElements * t.ElementSize;
            header[name] = new JsonObject
            {
                ["dtype"] = t.dtype switch
                {
                    ScalarType.Float32 => "F32",
                    ScalarType.BFloat16 => "BF16",
                    ScalarType.Float16 => "F16",
                    _ => throw new NotSupportedException($"Cannot write tensor '{name}' of dtype {t.dtype}."),
                },
                ["shape"] = new JsonArray(t.shape.Select(d => (JsonNode)d).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + size),
            };
            offset += size;
        }
        var headerBytes = Encoding.UTF8.GetBytes(header.ToJsonString());
        int pad = (8 - headerBytes.Length % 8) % 8;
        using var stream = File.Create(path);
        stream.Write(BitConverter.GetBytes((long)(headerBytes.Length + pad)));
        stream.Write(headerBytes);
        for (int i = 0; i < pad; i++) stream.WriteByte((byte)' ');
        foreach (var (_, t) in ordered)
        {
            using var c = t.cpu().contiguous();
            stream.Write(c.bytes);
        }
    }
}
