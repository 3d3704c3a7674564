using static TorchSharp.torch;

namespace LocalVllm.Engine.Loading;

/// <summary>
/// Loads checkpoint tensors by key from one safetensors file or several shards, checking them against the shapes the
/// model expects: a missing, unexpected or mis-shaped tensor is an error that names the key.
/// </summary>
public sealed class WeightLoader : IDisposable
{
    private readonly List<SafetensorsFile> _files = [];
    private readonly Dictionary<string, SafetensorsFile> _byName = new(StringComparer.Ordinal);

    /// <summary>Opens every file in <paramref name="paths"/>; a key present in two files is an error.</summary>
    public WeightLoader(IEnumerable<string> paths)
    {
        try
        {
            foreach (var path in paths)
            {
                var file = SafetensorsFile.Open(path);
                _files.Add(file);
                foreach (var name in file.Entries.Keys)
                    if (!_byName.TryAdd(name, file))
                        throw new InvalidDataException($"Tensor '{name}' appears in both '{_byName[name].Path}' and '{path}'.");
            }
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    /// <summary>All keys in the checkpoint.</summary>
    public IEnumerable<string> Keys => _byName.Keys;

    /// <summary>
    /// Checks that the checkpoint holds exactly <paramref name="expected"/> (key and shape), allowing the keys in
    /// <paramref name="optional"/> to be absent and those matched by <paramref name="ignored"/> to be present.
    /// </summary>
    public void Validate(IReadOnlyDictionary<string, long[]> expected, ISet<string> optional, Func<string, bool> ignored)
    {
        foreach (var (key, shape) in expected)
        {
            if (!_byName.TryGetValue(key, out var file))
            {
                if (optional.Contains(key)) continue;
                throw new InvalidDataException($"Missing tensor '{key}' (expected shape [{string.Join(", ", shape)}]) in the checkpoint.");
            }
            var actual = file.Entries[key].Shape;
            if (!actual.SequenceEqual(shape))
                throw new InvalidDataException(
                    $"Tensor '{key}' in '{file.Path}' has shape [{string.Join(", ", actual)}] but the model expects [{string.Join(", ", shape)}].");
        }
        foreach (var key in _byName.Keys)
            if (!expected.ContainsKey(key) && !ignored(key))
                throw new InvalidDataException($"Unexpected tensor '{key}' in '{_byName[key].Path}': the model has no parameter of that name.");
    }

    /// <summary>Whether the checkpoint holds <paramref name="key"/>.</summary>
    public bool Contains(string key) => _byName.ContainsKey(key);

    /// <summary>
    /// The tensors <paramref name="keys"/> stacked by rows into one new tensor, each read straight into its rows (no
    /// per-part tensors and no concatenation: with glibc's heap trimming off, those temporaries stayed resident).
    /// </summary>
    public Tensor ReadStacked(IReadOnlyList<string> keys, IReadOnlyDictionary<string, long[]> shapes, ScalarType dtype, Device device)
    {
        long[] first = shapes[keys[0]];
        long rows = keys.Sum(k => shapes[k][0]);
        if (device.type != TorchSharp.DeviceType.CPU)
        {
            var parts = keys.Select(k => Read(k, dtype, device)).ToArray();
            try { return cat(parts, 0); }
            finally { foreach (var p in parts) p.Dispose(); }
        }
        var stacked = empty([rows, .. first[1..]], dtype);
        long row = 0;
        foreach (var key in keys)
        {
            long n = shapes[key][0];
            using var slice = stacked.narrow(0, row, n);
            _byName[key].ReadInto(key, slice);
            row += n;
        }
        return stacked;
    }

    /// <summary>The stored bytes and safetensors dtype of <paramref name="key"/> (valid while this loader is open).</summary>
    internal unsafe (IntPtr Data, string DType) Raw(string key)
    {
        var file = _byName[key];
        return ((IntPtr)file.Data(key), file.Entries[key].DType);
    }

    /// <summary>The safetensors dtype <paramref name="key"/> is stored in ("F32", "BF16", ...), or null when absent.</summary>
    public string? StoredDType(string key) => _byName.TryGetValue(key, out var file) ? file.Entries[key].DType : null;

    /// <summary>Reads <paramref name="key"/> converted to <paramref name="dtype"/> on <paramref name="device"/>.</summary>
    public Tensor Read(string key, ScalarType dtype, Device device) => _byName[key].Read(key, dtype, device);

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
        _files.Clear();
    }
}
