using System.IO.MemoryMappedFiles;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace LocalVllm.Engine.Loading;

/// <summary>One tensor's entry in a safetensors header.</summary>
public sealed record SafetensorsEntry(string Name, string DType, long[] Shape, long Begin, long End);

/// <summary>
/// A memory-mapped safetensors file (8-byte header length, JSON header, raw little-endian data). Tensors are read
/// straight from the mapping into their final storage: the file is never copied whole into memory.
/// </summary>
public sealed unsafe class SafetensorsFile : IDisposable
{
    private readonly MemoryMappedFile _file;
    private readonly MemoryMappedViewAccessor _view;
    private readonly byte* _base;
    private readonly long _dataStart;

    private SafetensorsFile(string path, MemoryMappedFile file, MemoryMappedViewAccessor view, byte* basePtr,
        long dataStart, IReadOnlyDictionary<string, SafetensorsEntry> entries)
    {
        Path = path;
        _file = file;
        _view = view;
        _base = basePtr;
        _dataStart = dataStart;
        Entries = entries;
    }

    /// <summary>The file's path.</summary>
    public string Path { get; }
    /// <summary>The tensors in this file, by name.</summary>
    public IReadOnlyDictionary<string, SafetensorsEntry> Entries { get; }

    /// <summary>Maps <paramref name="path"/> and parses its header; a truncated or malformed file is an error naming it.</summary>
    public static SafetensorsFile Open(string path)
    {
        var info = new FileInfo(path);
        if (info.LinkTarget is not null) info = (FileInfo?)info.ResolveLinkTarget(returnFinalTarget: true) ?? info; // Hugging Face cache snapshots are symlinks into blobs/
        var length = info.Length;
        if (length < 8) throw new InvalidDataException($"'{path}' is truncated: {length} bytes, too short for a safetensors header.");
        var file = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        var view = file.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
        byte* ptr = null;
        view.SafeMemoryMappedViewHandle.AcquirePointer(ref ptr);
        ptr += view.PointerOffset;
        try
        {
            long headerLen = *(long*)ptr;
            if (headerLen <= 0 || 8 + headerLen > length)
                throw new InvalidDataException($"'{path}' is truncated or not a safetensors file: header of {headerLen} bytes in a {length}-byte file.");
            var header = JsonNode.Parse(new ReadOnlySpan<byte>(ptr + 8, (int)headerLen))?.AsObject()
                ?? throw new InvalidDataException($"'{path}' has an empty header.");
            long dataStart = 8 + headerLen;
            var entries = new Dictionary<string, SafetensorsEntry>(StringComparer.Ordinal);
            foreach (var (name, node) in header)
            {
                if (name == "__metadata__" || node is null) continue;
                var dtype = node["dtype"]!.GetValue<string>();
                var shape = node["shape"]!.AsArray().Select(d => d!.GetValue<long>()).ToArray();
                var offsets = node["data_offsets"]!.AsArray();
                long begin = offsets[0]!.GetValue<long>(), end = offsets[1]!.GetValue<long>();
                long expected = shape.Aggregate(1L, (a, b) => a * b) * ElementSize(dtype, name, path);
                if (end - begin != expected)
                    throw new InvalidDataException($"'{path}': tensor '{name}' has {end - begin} bytes but its shape [{string.Join(", ", shape)}] needs {expected}.");
                if (dataStart + end > length)
                    throw new InvalidDataException($"'{path}' is truncated: tensor '{name}' ends at byte {dataStart + end} but the file has {length} bytes.");
                entries[name] = new SafetensorsEntry(name, dtype, shape, begin, end);
            }
            return new SafetensorsFile(path, file, view, ptr, dataStart, entries);
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or NullReferenceException)
        {
            view.SafeMemoryMappedViewHandle.ReleasePointer();
            view.Dispose();
            file.Dispose();
            throw new InvalidDataException($"'{path}' has a malformed safetensors header: {e.Message}", e);
        }
        catch
        {
            view.SafeMemoryMappedViewHandle.ReleasePointer();
            view.Dispose();
            file.Dispose();
            throw;
        }
    }

    /// <summary>Reads <paramref name="name"/> into a new tensor of <paramref name="dtype"/> on <paramref name="device"/>.</summary>
    public Tensor Read(string name, ScalarType dtype, Device device)
    {
        var e = Entries[name];
        var stored = StoredType(e.DType, name, Path);
        var span = new ReadOnlySpan<byte>(_base + _dataStart + e.Begin, checked((int)(e.End - e.Begin)));
        var raw = torch.empty(e.Shape, stored, CPU);
        span.CopyTo(raw.bytes);
        if (stored == dtype && device.type == DeviceType.CPU) return raw;
        using (raw) return raw.to(dtype, device);
    }

    private static int ElementSize(string dtype, string name, string path) => dtype switch
    {
        "F32" or "I32" => 4,
        "BF16" or "F16" or "I16" => 2,
        "F64" or "I64" => 8,
        "U8" or "I8" or "BOOL" => 1,
        _ => throw new NotSupportedException($"'{path}': tensor '{name}' has unsupported dtype '{dtype}' (supported: F32, BF16, F16)."),
    };

    private static ScalarType StoredType(string dtype, string name, string path) => dtype switch
    {
        "F32" => ScalarType.Float32,
        "BF16" => ScalarType.BFloat16,
        "F16" => ScalarType.Float16,
        "F64" => ScalarType.Float64,
        _ => throw new NotSupportedException($"'{path}': tensor '{name}' has dtype '{dtype}'; weights must be F32, BF16 or F16."),
    };

    /// <inheritdoc />
    public void Dispose()
    {
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _file.Dispose();
    }
}
