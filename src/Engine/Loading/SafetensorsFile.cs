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

    /// <summary>The longest header accepted (the safetensors format's own limit).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    /// <summary>
    /// Maps <paramref name="path"/> and validates its whole header before any tensor is read: the header length, the
    /// JSON, every entry's dtype, shape and offsets (non-negative, ordered, inside the data section, no overlaps, sizes
    /// without overflow and equal to what the shape needs). A file that fails any check is an
    /// <see cref="InvalidDataException"/> naming the file and the tensor; no header can make a read leave the mapping.
    /// </summary>
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
            if (headerLen <= 0 || headerLen > MaxHeaderBytes || headerLen > length - 8)
                throw new InvalidDataException($"'{path}' is truncated or not a safetensors file: header of {headerLen} bytes in a {length}-byte file (at most {MaxHeaderBytes}).");
            var entries = ParseHeader(new ReadOnlySpan<byte>(ptr + 8, (int)headerLen), length - 8 - headerLen, path);
            return new SafetensorsFile(path, file, view, ptr, 8 + headerLen, entries);
        }
        catch
        {
            view.SafeMemoryMappedViewHandle.ReleasePointer();
            view.Dispose();
            file.Dispose();
            throw;
        }
    }

    /// <summary>Parses and checks a header whose data section has <paramref name="dataLength"/> bytes.</summary>
    internal static Dictionary<string, SafetensorsEntry> ParseHeader(ReadOnlySpan<byte> json, long dataLength, string path)
    {
        JsonObject header;
        try
        {
            header = JsonNode.Parse(json) as JsonObject
                ?? throw new InvalidDataException($"'{path}' has a malformed safetensors header: it is not a JSON object.");
        }
        catch (Exception e) when (e is JsonException or ArgumentException or InvalidOperationException)
        {
            throw new InvalidDataException($"'{path}' has a malformed safetensors header: {e.Message}", e);
        }
        var entries = new Dictionary<string, SafetensorsEntry>(StringComparer.Ordinal);
        string? current = null;
        try
        {
            foreach (var (name, node) in header) // names and values are decoded lazily: invalid UTF-8 surfaces here
            {
                current = name;
                if (name == "__metadata__") continue;
                entries[name] = ParseEntry(name, node, dataLength, path);
            }
        }
        catch (Exception e) when (e is not (InvalidDataException or OutOfMemoryException))
        {
            throw new InvalidDataException(current is null
                ? $"'{path}' has a malformed safetensors header: {e.Message}"
                : $"'{path}': tensor '{current}' has a malformed header entry: {e.Message}", e);
        }
        // Tensors may not share bytes.
        SafetensorsEntry? previous = null;
        foreach (var e in entries.Values.Where(e => e.End > e.Begin).OrderBy(e => e.Begin))
        {
            if (previous is not null && e.Begin < previous.End)
                throw new InvalidDataException($"'{path}': tensor '{e.Name}' (bytes {e.Begin}-{e.End}) overlaps tensor '{previous.Name}' (bytes {previous.Begin}-{previous.End}).");
            previous = e;
        }
        return entries;
    }

    private static SafetensorsEntry ParseEntry(string name, JsonNode? node, long dataLength, string path)
    {
        if (node is not JsonObject obj) throw new InvalidDataException($"'{path}': tensor '{name}' has a header entry that is not a JSON object.");
        string Where() => $"'{path}': tensor '{name}'";
        if (obj["dtype"] is not JsonValue dt || !dt.TryGetValue<string>(out var dtype))
            throw new InvalidDataException($"{Where()} has no dtype string.");
        int elementSize = ElementSize(dtype) ?? throw new InvalidDataException($"{Where()} has unknown dtype '{dtype}'.");
        if (obj["shape"] is not JsonArray shapeNode) throw new InvalidDataException($"{Where()} has no shape array.");
        var shape = new long[shapeNode.Count];
        for (int i = 0; i < shape.Length; i++)
            if (shapeNode[i] is not JsonValue d || !d.TryGetValue<long>(out shape[i]) || shape[i] < 0)
                throw new InvalidDataException($"{Where()} has an invalid shape: dimension {i} is not a non-negative integer.");
        if (obj["data_offsets"] is not JsonArray { Count: 2 } offsets
            || offsets[0] is not JsonValue b || !b.TryGetValue<long>(out var begin)
            || offsets[1] is not JsonValue e || !e.TryGetValue<long>(out var end))
            throw new InvalidDataException($"{Where()} has no data_offsets pair of integers.");
        if (begin < 0 || end < begin || end > dataLength)
            throw new InvalidDataException(end > dataLength && begin >= 0 && end >= begin
                ? $"'{path}' is truncated: tensor '{name}' ends at data byte {end} but the data section has {dataLength} bytes."
                : $"{Where()} has invalid data_offsets [{begin}, {end}] (the data section has {dataLength} bytes).");
        long expected;
        try
        {
            expected = checked(shape.Aggregate(1L, (a, x) => a * x) * elementSize);
        }
        catch (OverflowException)
        {
            throw new InvalidDataException($"{Where()} has a shape [{string.Join(", ", shape)}] whose size overflows.");
        }
        if (end - begin != expected)
            throw new InvalidDataException($"'{path}': tensor '{name}' has {end - begin} bytes but its shape [{string.Join(", ", shape)}] needs {expected}.");
        return new SafetensorsEntry(name, dtype, shape, begin, end);
    }

    /// <summary>Reads <paramref name="name"/> into a new tensor of <paramref name="dtype"/> on <paramref name="device"/>.</summary>
    public Tensor Read(string name, ScalarType dtype, Device device)
    {
        var e = Entries[name];
        var stored = StoredType(e.DType, name, Path);
        var raw = torch.empty(e.Shape, stored, CPU);
        long bytes = e.End - e.Begin; // checked against the shape and the data section at Open
        if (bytes <= int.MaxValue)
            new ReadOnlySpan<byte>(_base + _dataStart + e.Begin, (int)bytes).CopyTo(raw.bytes);
        else
        {
            // A tensor of 2 GiB or more (an f32 152k x 3584 embedding) is copied through views of at most 1 GiB, since a
            // span cannot cover it whole.
            int elementSize = (int)(bytes / Math.Max(1, raw.numel()));
            long chunk = (1L << 30) / elementSize;
            using var flat = raw.view(-1);
            for (long first = 0; first < flat.shape[0]; first += chunk)
            {
                long count = Math.Min(chunk, flat.shape[0] - first);
                using var part = flat.narrow(0, first, count);
                new ReadOnlySpan<byte>(_base + _dataStart + e.Begin + first * elementSize, checked((int)(count * elementSize))).CopyTo(part.bytes);
            }
        }
        if (stored == dtype && device.type == DeviceType.CPU) return raw;
        using (raw) return raw.to(dtype, device);
    }

    /// <summary>
    /// Reads <paramref name="name"/> into <paramref name="target"/> (a contiguous CPU tensor or row slice of one, of
    /// the entry's shape): the stored bytes copied as they are when the dtypes match, else converted by libtorch.
    /// </summary>
    public void ReadInto(string name, Tensor target)
    {
        var e = Entries[name];
        if (StoredType(e.DType, name, Path) == target.dtype && e.End - e.Begin <= int.MaxValue && target.is_contiguous())
        {
            new ReadOnlySpan<byte>(_base + _dataStart + e.Begin, (int)(e.End - e.Begin)).CopyTo(target.bytes);
            return;
        }
        using var t = Read(name, target.dtype, CPU);
        target.copy_(t);
    }

    /// <summary>
    /// The stored bytes of <paramref name="name"/> in the mapped file (valid while this file is open), for converting
    /// straight from the mapping without a temporary tensor (int8 quantization at load).
    /// </summary>
    internal byte* Data(string name) => _base + _dataStart + Entries[name].Begin;

    /// <summary>Bytes per element of a safetensors dtype, or null when the format does not define it.</summary>
    private static int? ElementSize(string dtype) => dtype switch
    {
        "F32" or "I32" or "U32" => 4,
        "BF16" or "F16" or "I16" or "U16" => 2,
        "F64" or "I64" or "U64" => 8,
        "U8" or "I8" or "BOOL" or "F8_E4M3" or "F8_E5M2" => 1,
        _ => null,
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
